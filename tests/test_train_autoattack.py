"""APGD-CE/DLR/T against the reference implementation (torchattacks, a port of fra31/auto-attack) sample for
sample; Square and the attack sequence by their guarantees (inside the ball, batch independence, monotone)."""
import pytest
import torch

from rankshard.train.apgd import APGDConfig, apgd, dlr_loss, dlr_targeted_loss
from rankshard.train.autoattack import AttackBudget, expand, run_sequence
from rankshard.train.fab import FABConfig, fab_t
from evaluate_demo import tiny_attack_setup
from rankshard.train.square import SquareConfig, square

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    return tiny_attack_setup(16, 16, 3)


def _per_sample(n, seed=0):
    return [torch.Generator().manual_seed(seed * 1000 + i) for i in range(n)]


REFERENCE_CASES = [("linf", 2 / 255, "ce"), ("l2", 0.1, "ce"), ("linf", 2 / 255, "dlr"), ("l2", 0.1, "dlr"),
                   ("linf", 1 / 255, "dlr-targeted")]


@pytest.mark.parametrize("norm,eps,loss", REFERENCE_CASES)
def test_apgd_equals_torchattacks_sample_for_sample(tiny, norm, eps, loss):
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = tiny
    # One generator seeded like torchattacks' global seed draws the same random start (CPU).
    adv, robust = apgd(model, x, y, APGDConfig(norm, eps, 20, loss, n_target_classes=3), torch.Generator().manual_seed(7))
    ta_norm = {"linf": "Linf", "l2": "L2"}[norm]
    if loss == "dlr-targeted":
        ref = torchattacks.APGDT(model, norm=ta_norm, eps=eps, steps=20, n_restarts=1, seed=7, n_classes=4)
    else:
        ref = torchattacks.APGD(model, norm=ta_norm, eps=eps, steps=20, n_restarts=1, seed=7, loss=loss)
    ref_adv = ref(x, y)
    with torch.no_grad():
        ref_robust = model(ref_adv).argmax(1) == y
    assert torch.equal(adv, ref_adv)
    assert torch.equal(robust, ref_robust)
    assert 0 < int(robust.sum()) < 13  # the comparison covers both fooled and robust samples


@pytest.mark.parametrize("eps", [1 / 255, 4 / 255])
def test_fab_t_equals_torchattacks_sample_for_sample(tiny, eps):
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = tiny
    adv, robust = fab_t(model, x, y, FABConfig(eps, 20, 3))  # one restart: deterministic, no random start
    ref_adv = torchattacks.FAB(model, norm="Linf", eps=eps, steps=20, n_restarts=1, multi_targeted=True,
                               n_classes=4)(x, y)
    with torch.no_grad():
        ref_robust = model(ref_adv).argmax(1) == y
    assert torch.equal(adv, ref_adv) and torch.equal(robust, ref_robust)
    assert int(robust.sum()) < 13  # FAB fooled some samples, so the comparison covers its adversarial points


def test_dlr_losses_match_their_definition():
    z = torch.tensor([[4.0, 1.0, 3.0, 0.0, 2.0]])
    y, t = torch.tensor([0]), torch.tensor([2])
    assert dlr_loss(z, y).item() == pytest.approx(-(4 - 3) / (4 - 2))  # top-1 is y: margin to the 2nd
    assert dlr_loss(z, torch.tensor([1])).item() == pytest.approx(-(1 - 4) / (4 - 2))
    assert dlr_targeted_loss(z, y, t).item() == pytest.approx(-(4 - 3) / (4 - 0.5 * (2 + 1)))


@pytest.mark.parametrize("norm,eps", [("linf", 2 / 255), ("l2", 0.1)])
def test_apgd_per_sample_generators_make_batches_irrelevant(tiny, norm, eps):
    model, x, y = tiny
    cfg = APGDConfig(norm, eps, 10, "ce")
    full_adv, full_robust = apgd(model, x, y, cfg, _per_sample(16))
    part_adv, part_robust = apgd(model, x[5:12], y[5:12], cfg, _per_sample(16)[5:12])
    assert torch.equal(part_robust, full_robust[5:12])
    assert torch.allclose(part_adv, full_adv[5:12], atol=1e-6)


def _inside(adv, x, norm, eps):
    d = (adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    return bool((size <= eps + 1e-6).all()) and float(adv.min()) >= 0 and float(adv.max()) <= 1


@pytest.mark.parametrize("attack", ["pgd", "apgd-ce", "apgd-t", "fab-t", "square"])
def test_attacks_return_misclassified_points_inside_the_ball(tiny, attack):
    model, x, y = tiny
    eps = 2 / 255
    res = run_sequence(model, x, y, [attack], "linf", eps, {attack: _per_sample(16)}, AttackBudget(5, 10, 3, 40, 10))
    with torch.no_grad():
        pred = model(res.adv).argmax(1)
    assert _inside(res.adv, x, "linf", eps)
    assert torch.equal(res.robust, pred == y)  # robust <=> the returned point is still classified correctly
    assert not res.robust[:3].any() and res.fooled_by[:3] == ["clean"] * 3


def test_square_batch_independent_and_only_attacks_clean_correct(tiny):
    model, x, y = tiny
    cfg = SquareConfig(2 / 255, 60)
    adv, robust = square(model, x, y, cfg, _per_sample(16))
    part_adv, part_robust = square(model, x[4:10], y[4:10], cfg, _per_sample(16)[4:10])
    assert torch.equal(part_robust, robust[4:10]) and torch.allclose(part_adv, adv[4:10], atol=1e-6)
    assert torch.equal(adv[:3], x[:3]) and _inside(adv, x, "linf", 2 / 255)


def test_square_schedule_follows_autoattack():
    cfg = SquareConfig(8 / 255, 10000)
    assert [cfg.p(i) for i in (0, 10, 11, 51, 201, 501, 1001, 2001, 4001, 6001, 8001)] == pytest.approx(
        [0.8 / d for d in (1, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512)])
    with pytest.raises(ValueError, match="only the L-inf"):
        SquareConfig(0.5, norm="l2")


def test_sequence_robustness_never_increases(tiny):
    model, x, y = tiny
    names = expand(["pgd", "aa"], "linf")
    assert names == ["pgd", "apgd-ce", "apgd-t", "fab-t", "square"]
    budget = AttackBudget(5, 10, 3, 30, 10)
    prev = None
    for k in range(1, len(names) + 1):
        res = run_sequence(model, x, y, names[:k], "linf", 2 / 255, {n: _per_sample(16, i) for i, n in enumerate(names)},
                           budget)
        if prev is not None:
            assert not (res.robust & ~prev).any()  # a prefix's non-robust samples stay non-robust
        prev = res.robust


def test_expand_refuses_unknown_and_l2_square():
    with pytest.raises(ValueError, match="unknown attack 'fgsm'"):
        expand(["fgsm"], "linf")
    for name in ("square", "fab-t"):
        with pytest.raises(ValueError, match="only L-inf"):
            expand([name], "l2")
    assert expand(["aa"], "l2") == ["apgd-ce", "apgd-t"]
