"""RIG, the rank-path variant and the attribution baselines against literal, independent references."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from rankshard.evaluate.rig.attribution import (IGConfig, SmoothGradConfig, integrated_gradients, quadrature, smoothgrad,
                                  vanilla_gradient)
from rankshard.evaluate.rig.rank_ig import RankPathConfig, RIGConfig, rank_path, rig, rig_ranks
from rankshard.preprocess.rank.engine import RankEngine
from rankshard.preprocess.sources.synth import natural_batch

torch.set_num_threads(1)
ENGINE = RankEngine("torch", device="cpu", workers=1)


class SmoothNet(nn.Module):
    """A tiny conv net with smooth activations: float32 vs float64 rank images cannot flip a ReLU pattern."""

    def __init__(self, classes: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 8, 3, stride=2), nn.Softplus(),
                                  nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, classes))

    def forward(self, x):
        return self.body(x) * 5.0  # sharper softmax: probabilities far from uniform


class Separable(nn.Module):
    """f(x) = sum(w * x + a * x^2 + b * sin(3 x)) as logit 0 (logit 1 is 0): a sum of per-pixel functions."""

    def __init__(self, shape, quadratic=0.0, wave=0.0, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w, self.a, self.b = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
        self.quadratic, self.wave = quadratic, wave

    def forward(self, x):
        f = (self.w * x + self.quadratic * self.a * x**2 + self.wave * self.b * torch.sin(3 * x)).flatten(1).sum(1)
        return torch.stack([f, torch.zeros_like(f)], dim=1)


@pytest.fixture(scope="module")
def net():
    return SmoothNet().double().eval()


@pytest.fixture(scope="module")
def images():
    return torch.from_numpy(natural_batch(2, size=(16, 12), seed=3))  # float64, non-square: n = 12


def literal_terms(model, x, output="prob", reduction="max-abs"):
    """Per rank k = 1..n: an np.linalg.svd reconstruction, one forward/backward, the channel reduction."""
    c, h, w = x.shape
    n = min(h, w)
    with torch.no_grad():
        target = int(model(x[None]).argmax())
    svds = [np.linalg.svd(x[ch].numpy(), full_matrices=False) for ch in range(c)]
    terms = {}
    for k in range(1, n + 1):
        xk = np.stack([sum(s[j] * np.outer(u[:, j], vh[j]) for j in range(k)) for u, s, vh in svds])
        t = torch.tensor(xk, requires_grad=True)
        logits = model(t[None])[0]
        out = torch.softmax(logits, 0)[target] if output == "prob" else logits[target]
        (g,) = torch.autograd.grad(out, t)
        g = g.numpy()
        terms[k] = {"max-abs": np.abs(g).max(0), "sum": g.sum(0), "max": g.max(0)}[reduction]
    return terms, target


def literal_rig(model, x, output="prob", reduction="max-abs"):
    """Eq. 3 literally: sum over k = 1..n of (n - k) / n times the reduced gradient at x_k."""
    terms, target = literal_terms(model, x, output, reduction)
    n = len(terms)
    return sum((n - k) / n * terms[k] for k in terms), target


@pytest.mark.parametrize("output,reduction", [("prob", "max-abs"), ("logit", "sum"), ("prob", "max")])
def test_batched_rig_equals_literal_eq3(net, images, output, reduction):
    for x in images:
        expected, target = literal_rig(net, x, output, reduction)
        got = rig(net, x, RIGConfig(output=output, reduction=reduction, batch_size=5), ENGINE)
        assert got.target == target and got.ranks == list(range(1, 12))
        scale = np.abs(expected).max()
        # the engine's rank images are float32 (error ~1e-7 of the [0, 1] scale); everything else is float64
        np.testing.assert_allclose(got.map.numpy(), expected, rtol=0, atol=1e-5 * scale)


def test_rig_does_not_depend_on_batch_size(net, images):
    x = images[0]
    maps = [rig(net, x, RIGConfig(batch_size=b), ENGINE) for b in (1, 4, 64)]
    for m in maps[1:]:
        np.testing.assert_allclose(m.map.numpy(), maps[0].map.numpy(), rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(m.values, maps[0].values, rtol=1e-10)
    cfg = RankPathConfig(rule="trapezoid", steps=2)
    paths = [rank_path(net, x, RankPathConfig(**{**cfg.__dict__, "batch_size": b}), ENGINE) for b in (1, 7, 50)]
    for p in paths[1:]:
        np.testing.assert_allclose(p.per_channel.numpy(), paths[0].per_channel.numpy(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("n,stride", [(12, 1), (12, 5), (224, 8), (7, 3), (1, 1)])
def test_rig_weights_blocks(n, stride):
    ranks, w = rig_ranks(n, stride)
    full_ranks, full_w = rig_ranks(n, 1)
    assert full_ranks == list(range(1, n))  # rank n has weight 0
    np.testing.assert_allclose(full_w, [(n - k) / n for k in full_ranks])
    assert ranks == [k for k in range(1, n + 1, stride) if k < n]
    # each evaluated rank carries its block's weight: the totals agree, (n - 1) / 2
    assert np.isclose(w.sum(), (n - 1) / 2) and np.isclose(full_w.sum(), (n - 1) / 2)


def test_strided_rig_equals_block_weighted_literal(net, images):
    x = images[1]
    terms, target = literal_terms(net, x)
    ranks, w = rig_ranks(12, 4)
    expected = sum(wi * terms[k] for k, wi in zip(ranks, w))
    strided = rig(net, x, RIGConfig(stride=4, batch_size=2), ENGINE)
    assert strided.ranks == ranks == [1, 5, 9] and strided.target == target
    assert strided.weights == pytest.approx([sum((12 - j) / 12 for j in range(k, k + 4)) for k in ranks])
    np.testing.assert_allclose(strided.map.numpy(), expected, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("quadratic,wave,rule,steps,tol", [
    (0.0, 0.0, "left", 1, 1e-10),        # linear: SPEC's left sum is exact
    (1.0, 0.0, "trapezoid", 1, 1e-10),   # quadratic per pixel: trapezoid is exact on every segment
    (1.0, 1.0, "gauss-legendre", 8, 1e-9),  # smooth: Gauss-Legendre converges fast
])
def test_rank_path_completeness_on_separable_functions(images, quadratic, wave, rule, steps, tol):
    x = images[0]
    f = Separable(x.shape, quadratic, wave).eval()
    res = rank_path(f, x, RankPathConfig(output="logit", rule=rule, steps=steps, batch_size=6), ENGINE, target=0)
    expected_gap = float(f(x[None])[0, 0] - f(torch.zeros_like(x)[None])[0, 0])
    assert res.f_x - res.f_0 == pytest.approx(expected_gap)
    assert abs(res.delta) <= tol * max(1.0, abs(expected_gap)), res.delta
    assert res.knots == list(range(13))


def test_rank_path_delta_shrinks_with_steps(net, images):
    x = images[0]
    deltas = [abs(rank_path(net, x, RankPathConfig(rule="left", steps=s), ENGINE).delta) for s in (1, 8)]
    gl = abs(rank_path(net, x, RankPathConfig(rule="gauss-legendre", steps=4), ENGINE).delta)
    assert deltas[1] < deltas[0] and gl < 1e-3 * max(deltas[0], 1e-12) + 1e-9


def test_rank_path_left_rule_is_spec_sum(net, images):
    """sum_k grad f(x_k) * (x_{k+1} - x_k), k = 0..n-1, x_0 = 0, x_n = x, written out with numpy SVDs."""
    x = images[1]
    c, h, w = x.shape
    n = min(h, w)
    with torch.no_grad():
        target = int(net(x[None]).argmax())
    svds = [np.linalg.svd(x[ch].numpy(), full_matrices=False) for ch in range(c)]
    xs = [np.zeros(x.shape)] + [np.stack([(u[:, :k] * s[:k]) @ vh[:k] for u, s, vh in svds]) for k in range(1, n)]
    xs.append(x.numpy())
    total = np.zeros(x.shape)
    for k in range(n):
        t = torch.tensor(xs[k], requires_grad=True)
        (g,) = torch.autograd.grad(torch.softmax(net(t[None])[0], 0)[target], t)
        total += g.numpy() * (xs[k + 1] - xs[k])
    got = rank_path(net, x, RankPathConfig(batch_size=5), ENGINE)
    np.testing.assert_allclose(got.per_channel.numpy(), total, atol=1e-5 * np.abs(total).max())


@pytest.mark.parametrize("rule,steps", [("gauss-legendre", 3), ("trapezoid", 5), ("left", 2), ("midpoint", 4)])
def test_ig_on_linear_model_is_input_times_weight(images, rule, steps):
    x = images[0]
    torch.manual_seed(1)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(x.numel(), 3)).double().eval()
    attr = integrated_gradients(lin, x, 2, IGConfig(steps=steps, rule=rule), output="logit", batch_size=2)
    expected = x * lin[1].weight[2].detach().view_as(x)
    np.testing.assert_allclose(attr.numpy(), expected.numpy(), rtol=1e-12, atol=1e-14)


def test_ig_completeness_and_vanilla_gradient(net, images):
    x = images[1]
    target = 1
    attr = integrated_gradients(net, x, target, IGConfig(steps=32), output="prob", batch_size=9)
    with torch.no_grad():
        p = torch.softmax(net(torch.stack([x, torch.zeros_like(x)])), 1)[:, target]
    assert float(attr.sum()) == pytest.approx(float(p[0] - p[1]), abs=1e-6)
    t = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(torch.softmax(net(t[None])[0], 0)[target], t)
    np.testing.assert_allclose(vanilla_gradient(net, x, target).numpy(), g.numpy(), rtol=1e-12)


def test_smoothgrad_seeded_and_zero_noise_is_vanilla(net, images):
    x = images[0]
    a = smoothgrad(net, x, 0, SmoothGradConfig(samples=5, seed=7), batch_size=2)
    b = smoothgrad(net, x, 0, SmoothGradConfig(samples=5, seed=7), batch_size=5)
    c = smoothgrad(net, x, 0, SmoothGradConfig(samples=5, seed=8), batch_size=5)
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-15)
    assert not np.allclose(a.numpy(), c.numpy())
    z = smoothgrad(net, x, 0, SmoothGradConfig(samples=3, sigma=0.0))
    np.testing.assert_allclose(z.numpy(), vanilla_gradient(net, x, 0).numpy(), rtol=1e-12)


@pytest.mark.parametrize("rule", ["left", "right", "midpoint", "trapezoid", "gauss-legendre"])
def test_quadrature_rules_integrate_polynomials(rule):
    t, w = quadrature(rule, 6)
    assert w.sum() == pytest.approx(1.0) and ((t >= 0) & (t <= 1)).all()
    exact_degree = {"gauss-legendre": 11, "trapezoid": 1, "midpoint": 1, "left": 0, "right": 0}[rule]
    for d in range(exact_degree + 1):
        assert (w * t**d).sum() == pytest.approx(1 / (d + 1), rel=1e-12)


def test_attributions_need_eval_mode(images):
    model = SmoothNet().double().train()
    with pytest.raises(ValueError, match="eval"):
        vanilla_gradient(model, images[0], 0)


# -- sanity-check machinery ----------------------------------------------------------------------------


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=200).astype(float)  # many ties
    b = a + rng.normal(0, 2, size=200)
    from rankshard.evaluate.rig.check import spearman
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    assert spearman(a, a) == pytest.approx(1.0) and spearman(a, -a) == pytest.approx(-1.0)


def test_randomization_stages_leave_the_model_alone():
    from rankshard.evaluate.rig.check import randomized_models
    from rankshard.train.models import build_model
    torch.manual_seed(0)
    model = build_model("resnet18", "cifar", 10, width=4).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stages = [(name, {k: v.clone() for k, v in m.state_dict().items()}) for name, m in randomized_models(model)]
    assert [s for s, _ in stages][:3] == ["cascade:fc", "cascade:layer4", "cascade:layer3"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    fc_changed = not torch.equal(stages[0][1]["fc.weight"], before["fc.weight"])
    conv1_kept_at_first = torch.equal(stages[0][1]["conv1.weight"], before["conv1.weight"])
    assert fc_changed and conv1_kept_at_first
    assert not torch.equal(stages[-1][1]["conv1.weight"], before["conv1.weight"])  # cumulative down to the stem
    again = [m.state_dict()["fc.weight"].clone() for _, m in randomized_models(model, seed=0)][0]
    assert torch.equal(again, stages[0][1]["fc.weight"])  # seeded


# -- the CLI on demo shards ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from rankshard.preprocess.pipeline import ArraySource, materialize_split
    from rankshard.preprocess.spec import ShardSpec
    from rankshard.preprocess.sources.synth import labelled_images
    from rankshard.train.checkpoint import checkpoint_payload, save_checkpoint
    from rankshard.train.models import build_model

    out = tmp_path_factory.mktemp("rig")
    images, labels = labelled_images(1, seed=1)
    src = ArraySource(images, labels, [f"m:{i}" for i in range(len(labels))], tuple("abcdefghij"),
                      {"kind": "test", "path": "memory", "fingerprint": "rig", "checksum_verified": False})
    spec = ShardSpec(dataset="cifar10", split="val", ranks=(), spectra=False, shuffle=False, shard_size=4, workers=0)
    materialize_split(src, spec, out / "shards", show_progress=False)
    ckpts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        ckpts.append(save_checkpoint(out / f"net{seed}.pt", checkpoint_payload(build_model("resnet18", "cifar", 10,
                                                                                          width=8))))
    return out, ckpts


def _invoke(args):
    from click.testing import CliRunner
    from rankshard.evaluate.cli import main
    return CliRunner().invoke(main, ["rig", *map(str, args)], catch_exceptions=False)


def test_cli_maps_figures_and_summary(demo, tmp_path):
    out, ckpts = demo
    res = _invoke([*ckpts, "--data", out / "shards", "--split", "val", "--keys", "00000005,00000002", "--out", tmp_path / "r",
                   "--methods", "vanilla,rig,ig,smoothgrad,rank-path", "--stride", "4", "--ig-steps", "3",
                   "--sg-samples", "2", "--svd-backend", "torch"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "r" / "rig.json").read_text())
    assert summary["kind"] == "rig" and "provenance" in summary and "compare.png" in summary["figures"]
    assert summary["inputs"]["names"] == ["00000005", "00000002"] and summary["inputs"]["labels"] == [5, 2]
    for ck in summary["checkpoints"]:
        for method, path in ck["maps"].items():
            arr = np.load(path)
            assert arr.shape == (2, 32, 32) and arr.dtype == np.float32 and np.isfinite(arr).all()
        assert (tmp_path / "r" / ck["name"] / "maps.png").stat().st_size > 1000
        assert ck["rank_path"]["per_image"][0]["knots"] == 9  # 0, 4, ..., 28, 32
    assert (tmp_path / "r" / "compare.png").exists()
    # the CLI's RIG equals the library call on the same shard image and checkpoint
    from rankshard.evaluate.checkpoints import load_checkpoints
    model = load_checkpoints([str(ckpts[0])], "cpu")[0].model
    x = torch.from_numpy(np.load(tmp_path / "r" / "images.npy")[0])
    direct = rig(model, x, RIGConfig(stride=4), RankEngine("torch", device="cpu")).map.numpy()
    np.testing.assert_allclose(np.load(summary["checkpoints"][0]["maps"]["rig"])[0], direct, rtol=1e-4, atol=1e-7)


def test_cli_check_reports_randomization_and_delta(demo, tmp_path):
    out, ckpts = demo
    res = _invoke([ckpts[0], "--data", out / "shards", "--split", "val", "--index", "0:1", "--out", tmp_path / "c", "--check",
                   "--randomization", "all", "--stride", "8", "--svd-backend", "torch"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "c" / "net0" / "check.json").read_text())
    assert set(report["spearman"]) == {"vanilla", "rig"}
    assert report["spearman"]["rig"][0]["stage"] == "all"
    assert -1 <= report["spearman"]["rig"][0]["spearman_mean"] <= 1
    assert np.isfinite(report["rank_path"]["max_abs_delta"])
    assert "randomization rig: Spearman all=" in res.output


def test_cli_images_and_clear_errors(demo, tmp_path):
    from PIL import Image
    out, ckpts = demo
    img = tmp_path / "photo.png"
    Image.fromarray((natural_batch(1, size=(40, 56))[0].transpose(1, 2, 0) * 255).astype(np.uint8)).save(img)
    res = _invoke([ckpts[0], "--images", img, "--out", tmp_path / "i", "--stride", "8", "--svd-backend", "torch"])
    assert res.exit_code == 0, res.output
    assert np.load(tmp_path / "i" / "images.npy").shape == (1, 3, 32, 32)
    bad = _invoke([ckpts[0], "--data", out / "shards", "--split", "val", "--keys", "99999999", "--out", tmp_path / "x"])
    assert bad.exit_code == 2 and "99999999" in bad.output
    both = _invoke([ckpts[0], "--data", out / "shards", "--split", "val", "--index", "0:1", "--keys", "00000001",
                    "--out", tmp_path / "y"])
    assert both.exit_code == 2 and "exactly one" in both.output
    unknown = _invoke([ckpts[0], "--images", img, "--methods", "rig,gradcam", "--out", tmp_path / "z"])
    assert unknown.exit_code == 2 and "gradcam" in unknown.output


def test_cli_shape_matches_the_other_subcommands(demo, tmp_path):
    """--data is the shard root as for accuracy/spectrum/pgd, --split defaults to test and a wrong one is named,
    --out is required (no rig-out/ in the working directory)."""
    out, ckpts = demo
    wrong = _invoke([ckpts[0], "--data", out / "shards", "--index", "0:1", "--out", tmp_path / "w"])
    assert wrong.exit_code == 2 and "--split test" in wrong.output and "['val']" in wrong.output, wrong.output
    assert not (tmp_path / "w").exists()
    inner = _invoke([ckpts[0], "--data", out / "shards" / "cifar10", "--split", "val", "--index", "0:1",
                     "--out", tmp_path / "i"])
    assert inner.exit_code == 2 and "--split val" in inner.output  # ROOT is the folder above the dataset
    from click.testing import CliRunner
    from rankshard.evaluate.cli import main
    missing = CliRunner().invoke(main, ["rig", str(ckpts[0]), "--data", str(out / "shards"), "--index", "0:1"])
    assert missing.exit_code == 2 and "--out" in missing.output


def test_compare_rows_name_every_checkpoints_class():
    """compare.png's rows said 'class 3' (the first checkpoint's) while the second explained classes 0 and 7."""
    from rankshard.evaluate.rig.inputs import InputBatch
    from rankshard.evaluate.rig.run import _row_labels
    batch = InputBatch(np.zeros((2, 3, 4, 4), np.float32), ["00000000", "cat.jpg"], [0, -1])
    assert _row_labels(batch, [3, 3]) == ["00000000\nlabel 0, class 3", "cat.jpg\nclass 3"]
    assert _row_labels(batch, [3, 3], [0, 7]) == ["00000000\nlabel 0, classes 3 / 0", "cat.jpg\nclasses 3 / 7"]
