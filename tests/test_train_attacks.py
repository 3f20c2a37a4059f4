"""rankshard.train.attacks: PGD constraints, determinism, agreement with a literal reference loop, targeted success."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare
from torch import nn

from rankshard.preprocess.sources.synth import labelled_images
from rankshard.train.attacks import PAPER_PGD, PGDConfig, parse_eps, pgd, random_targets
from rankshard.train.models import build_model


def _data(per_class=6, seed=0, dtype=torch.float32):
    images, labels = labelled_images(per_class, size=(16, 16), seed=seed)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(dtype) / 255
    return x, torch.from_numpy(labels)


def _small_cnn(dtype=torch.float32, seed=0):
    """An undefended CNN (ReLU kinks and pooling, unlike a linear model), fitted briefly to synth classes."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(4), nn.Flatten(),
                        nn.Linear(8 * 4 * 4, 10)).to(dtype)
    x, y = _data(10, seed=1, dtype=dtype)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(40):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return net.eval()


@pytest.fixture(scope="module")
def cnn():
    return _small_cnn()


@pytest.fixture(scope="module")
def cnn64():
    return _small_cnn(torch.float64, seed=1)


def test_config_defaults_parsing_and_validation():
    assert parse_eps("4/255") == pytest.approx(4 / 255) and parse_eps(" 8 / 255 ") == pytest.approx(8 / 255)
    assert parse_eps("0.5") == 0.5 and parse_eps(3) == 3.0
    with pytest.raises(ValueError, match="fraction such as '4/255'"):
        parse_eps("4//255")
    cfg = PGDConfig("linf", "4/255", 20)
    assert cfg.eps == pytest.approx(4 / 255) and cfg.alpha == pytest.approx(2.5 * (4 / 255) / 20)
    assert PGDConfig("l2", 3.0, 7, step_size=0.5).alpha == 0.5  # L2 eps > 1 is legitimate (ImageNet eps=3)
    assert PAPER_PGD.targeted and PAPER_PGD.steps == 20
    with pytest.raises(ValueError, match=r"did you mean 4/255 = 0\.01569"):
        PGDConfig("linf", 4, 20)
    with pytest.raises(ValueError, match=r"unknown norm 'inf'; choose one of \['l2', 'linf'\]"):
        PGDConfig("inf", 0.1, 20)
    for bad in (dict(eps=-0.1), dict(steps=2.5), dict(restarts=0), dict(step_size=float("nan"))):
        with pytest.raises(ValueError, match="PGDConfig"):
            PGDConfig(**{"norm": "linf", "eps": 0.1, "steps": 3, **bad})


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
@pytest.mark.parametrize("targeted", [False, True])
def test_examples_stay_in_ball_and_pixel_range(cnn, norm, eps, targeted):
    x, y = _data()
    gen = torch.Generator().manual_seed(0)
    target = random_targets(y, 10, gen) if targeted else None
    adv = pgd(cnn, x, y, PGDConfig(norm, eps, 5, targeted=targeted), target, gen)
    delta = (adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert float(size.max()) <= eps * (1 + 1e-5)
    assert float(size.max()) >= 0.5 * eps  # it did move
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1 and adv.dtype == x.dtype and not adv.requires_grad


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_eps_zero_changes_nothing(cnn, norm):
    x, y = _data()
    adv = pgd(cnn, x, y, PGDConfig(norm, 0.0, 5), generator=torch.Generator().manual_seed(1))
    assert torch.equal(adv, x)
    with torch.no_grad():
        assert torch.equal(cnn(adv).argmax(1), cnn(x).argmax(1))


def test_targeted_attack_reaches_targets_and_untargeted_fools(cnn):
    x, y = _data(5, seed=3)
    gen = torch.Generator().manual_seed(2)
    target = random_targets(y, 10, gen)
    with torch.no_grad():  # pgd turns gradients back on for itself
        assert float((cnn(x).argmax(1) == y).float().mean()) > 0.7  # the model learned the classes
        # The synth classes differ by palette, so pixel-space margins are wide: success needs a large eps.
        hits = [float((cnn(pgd(cnn, x, y, PGDConfig("linf", e / 255, 10, targeted=True), target, gen)).argmax(1)
                       == target).float().mean()) for e in (4, 16, 64)]
        fooled = (cnn(pgd(cnn, x, y, PGDConfig("l2", 2.0, 10), generator=gen)).argmax(1) != y).float().mean()
    assert hits == sorted(hits) and hits[-1] > 0.8
    assert float(fooled) > 0.8


def test_weights_untouched_and_flags_restored(cnn):
    x, y = _data()
    cnn[0].bias.requires_grad_(False)  # a parameter the caller froze stays frozen
    before = [p.detach().clone() for p in cnn.parameters()]
    try:
        pgd(cnn, x, y, PGDConfig("l2", 0.5, 3))
        assert all(p.grad is None for p in cnn.parameters())
        assert [p.requires_grad for p in cnn.parameters()] == [True, False, True, True]
        assert all(torch.equal(a, b) for a, b in zip(before, cnn.parameters()))
    finally:
        cnn[0].bias.requires_grad_(True)


def test_our_resnet_in_eval_mode_keeps_bn_statistics():
    model = build_model("resnet18", "cifar", 10, width=4).eval()
    x, y = _data(1)
    stats = model.bn1.running_mean.clone()
    adv = pgd(model, x, y, PGDConfig("linf", 4 / 255, 2), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.bn1.running_mean, stats) and adv.shape == x.shape


def _reference_pgd(model, x, goal, targeted, norm, eps, steps, alpha, restarts, use_best, gen):
    """A literal PGD loop (Madry et al.; robustness semantics), written without rankshard.train.attacks."""
    best_x, best_obj = x.clone(), torch.full((len(x),), -float("inf"), dtype=x.dtype)
    for _ in range(restarts):
        u = torch.rand(x.shape, generator=gen, dtype=x.dtype)
        if norm == "linf":
            cur = (x + (2 * u - 1) * eps).clamp(0, 1)
        else:
            d = u - 0.5
            n = d.flatten(1).norm(dim=1)
            cur = (x + d * torch.where(n > eps, eps / (n + 1e-7), 1.0).view(-1, 1, 1, 1)).clamp(0, 1)
        run_x, run_obj = cur.clone(), torch.full((len(x),), -float("inf"), dtype=x.dtype)
        for it in range(steps + 1):
            cur.requires_grad_(True)
            ce = F.cross_entropy(model(cur), goal, reduction="none")
            obj = -ce if targeted else ce
            g, = torch.autograd.grad(obj.sum(), [cur])
            cur = cur.detach()
            for i in range(len(x)):  # best iterate, one sample at a time
                if (use_best or it == steps) and obj[i] > run_obj[i]:
                    run_x[i], run_obj[i] = cur[i], obj[i].detach()
            if it == steps:
                break
            if norm == "linf":
                cur = x + (cur + alpha * g.sign() - x).clamp(-eps, eps)
            else:
                cur = cur + alpha * g / (g.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-10)
                d = cur - x
                n = d.flatten(1).norm(dim=1)
                cur = x + d * torch.where(n > eps, eps / (n + 1e-7), 1.0).view(-1, 1, 1, 1)
            cur = cur.clamp(0, 1)
        if not use_best:
            run_x, run_obj = cur.clone(), obj.detach()
        for i in range(len(x)):
            if run_obj[i] > best_obj[i]:
                best_x[i], best_obj[i] = run_x[i], run_obj[i]
    return best_x


@pytest.mark.parametrize("norm,eps,targeted,restarts,use_best", [
    ("linf", 8 / 255, False, 1, True),
    ("linf", 8 / 255, True, 2, True),
    ("l2", 0.75, False, 2, False),
    ("l2", 0.75, True, 1, True),
])
def test_matches_reference_loop(cnn64, norm, eps, targeted, restarts, use_best):
    model = cnn64
    x, y = _data(2, seed=4, dtype=torch.float64)
    goal = random_targets(y, 10, torch.Generator().manual_seed(9)) if targeted else y
    cfg = PGDConfig(norm, eps, 6, targeted=targeted, restarts=restarts, use_best=use_best)
    got = pgd(model, x, y, cfg, goal if targeted else None, torch.Generator().manual_seed(3))
    want = _reference_pgd(model, x, goal, targeted, norm, eps, 6, cfg.alpha, restarts, use_best,
                          torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


def test_seeded_runs_repeat_and_best_iterate_is_no_worse(cnn):
    x, y = _data()
    cfg = PGDConfig("linf", 4 / 255, 8)
    a = pgd(cnn, x, y, cfg, generator=torch.Generator().manual_seed(7))
    b = pgd(cnn, x, y, cfg, generator=torch.Generator().manual_seed(7))
    c = pgd(cnn, x, y, cfg, generator=torch.Generator().manual_seed(8))
    last = pgd(cnn, x, y, PGDConfig("linf", 4 / 255, 8, use_best=False), generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with torch.no_grad():
        ce_best = F.cross_entropy(cnn(a), y, reduction="none")
        ce_last = F.cross_entropy(cnn(last), y, reduction="none")
    assert bool((ce_best >= ce_last - 1e-6).all())


def test_argument_errors(cnn):
    x, y = _data(1)
    with pytest.raises(ValueError, match=r"\[0, 1\] pixel space"):
        pgd(cnn, x * 2 - 1, y, PGDConfig("linf", 0.01, 1))
    with pytest.raises(ValueError, match="needs target"):
        pgd(cnn, x, y, PGDConfig("linf", 0.01, 1, targeted=True))
    with pytest.raises(ValueError, match="targeted is False"):
        pgd(cnn, x, y, PGDConfig("linf", 0.01, 1), target=y)


def test_random_targets_differ_from_labels_and_are_uniform():
    num_classes, n = 10, 20_000
    labels = torch.arange(n) % num_classes
    t = random_targets(labels, num_classes, torch.Generator().manual_seed(0))
    assert not bool((t == labels).any()) and int(t.min()) >= 0 and int(t.max()) < num_classes
    assert torch.equal(t, random_targets(labels, num_classes, torch.Generator().manual_seed(0)))
    for c in (0, 7):  # for a fixed label, the 9 other classes are equally likely
        counts = np.bincount(t[labels == c].numpy(), minlength=num_classes)
        assert counts[c] == 0 and chisquare(np.delete(counts, c)).pvalue > 1e-3
    with pytest.raises(ValueError, match="at least 2 classes"):
        random_targets(labels[:3] * 0, 1)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        random_targets(labels, 5)
