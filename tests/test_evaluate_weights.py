"""Conv-weight SVD analysis against independent references: dense operator matrices built with F.conv2d,
numpy SVDs, literal formulas and synthetic samples with known answers."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rankshard.evaluate.weights.rmt import (RMTConfig, effective_rank, fit_marchenko_pastur, fit_powerlaw, mp_density,
                          mp_quantile, powerlaw_mle, stable_rank, esd)
from rankshard.evaluate.weights.spectra import (WeightsConfig, analyse_model, conv_operator_svdvals, discover_layers, gram_svdvals,
                              layer_row, permuted_weight, select_layers, unfold_svd)
from rankshard.evaluate.weights.report import run_weights_analysis


def dense_circular_conv(weight: torch.Tensor, hw: tuple[int, int], stride: int, dilation: int = 1,
                        groups: int = 1) -> np.ndarray:
    """The convolution as an explicit matrix: F.conv2d applied to every basis image, circularly padded.

    Padding is built by index wrap-around (not F.pad) so kernels larger than the input wrap several times.
    """
    h, w = hw
    c = weight.shape[1] * groups
    basis = torch.eye(c * h * w, dtype=torch.float64).reshape(-1, c, h, w)
    eh = dilation * (weight.shape[2] - 1)
    ew = dilation * (weight.shape[3] - 1)
    rows = torch.arange(h + eh) % h
    cols = torch.arange(w + ew) % w
    padded = basis[:, :, rows][:, :, :, cols]
    out = F.conv2d(padded, weight.double(), stride=stride, dilation=dilation, groups=groups)
    return out.reshape(c * h * w, -1).T.numpy()


OPERATOR_CASES = [
    # (out, in, kh, kw, (H, W), stride, dilation, groups)
    (3, 2, 3, 3, (6, 6), 1, 1, 1),
    (4, 3, 3, 2, (6, 6), 2, 1, 1),  # stride 2, non-square kernel, in != out
    (2, 5, 5, 3, (8, 8), 2, 1, 1),  # more inputs than outputs
    (5, 2, 3, 3, (8, 6), 2, 1, 1),  # rectangular input
    (2, 3, 3, 3, (9, 9), 3, 1, 1),  # stride 3, odd grid
    (6, 3, 1, 1, (4, 4), 2, 1, 1),  # 1x1 strided (ResNet downsample)
    (4, 4, 3, 3, (6, 6), 1, 2, 2),  # dilation and groups
    (3, 2, 7, 7, (4, 4), 1, 1, 1),  # kernel larger than the input wraps around
    (4, 4, 1, 1, (5, 5), 1, 1, 1),  # 1x1 stride 1: the matrix case
]


@pytest.mark.parametrize("method,cdtype", [("gram", torch.complex128), ("gram", torch.complex64),
                                           ("svd", torch.complex128)])
@pytest.mark.parametrize("o,c,kh,kw,hw,stride,dilation,groups", OPERATOR_CASES)
def test_operator_spectrum_matches_dense_matrix(o, c, kh, kw, hw, stride, dilation, groups, method, cdtype):
    gen = torch.Generator().manual_seed(o * 100 + c * 10 + kh)
    weight = torch.randn(o, c // groups, kh, kw, generator=gen, dtype=torch.float64)
    ref = np.linalg.svd(dense_circular_conv(weight, hw, stride, dilation, groups), compute_uv=False)
    got = conv_operator_svdvals(weight, hw, stride, dilation, groups, dtype=cdtype, method=method).numpy()
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-5 * ref.max(), rtol=0)


def test_operator_spectrum_float32_close_to_float64():
    w = torch.randn(8, 6, 3, 3, generator=torch.Generator().manual_seed(1))
    lo = conv_operator_svdvals(w, 10, 2, dtype=torch.complex64, method="svd").double()
    hi = conv_operator_svdvals(w, 10, 2, dtype=torch.complex128, method="svd")
    assert torch.allclose(lo, hi, atol=1e-4 * hi.max().item())


def test_operator_frobenius_is_parseval():
    """Stride 1: every weight appears H*W times in the operator, so ||A||_F^2 = H*W*||W||_F^2."""
    w = torch.randn(5, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    s = conv_operator_svdvals(w, (7, 9), 1, dtype=torch.complex128)
    assert math.isclose(float((s**2).sum()), 63 * float((w**2).sum()), rel_tol=1e-10)


def test_operator_stride_must_divide_input():
    with pytest.raises(ValueError, match="not divisible by stride 2x2"):
        conv_operator_svdvals(torch.randn(2, 2, 3, 3), 7, 2)


def test_unfold_svd_matches_numpy():
    w = torch.randn(6, 3, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    mat = w.reshape(6, -1).numpy()
    u_np, s_np, vh_np = np.linalg.svd(mat, full_matrices=False)
    got = unfold_svd(w)
    np.testing.assert_allclose(got.s.numpy(), s_np, rtol=1e-12)
    # vectors agree up to sign (distinct singular values): |<u_i, u_np_i>| = 1
    np.testing.assert_allclose(np.abs(np.sum(got.u.numpy() * u_np, axis=0)), 1.0, atol=1e-10)
    np.testing.assert_allclose(np.abs(np.sum(got.vh.numpy() * vh_np, axis=1)), 1.0, atol=1e-10)
    np.testing.assert_allclose((got.u * got.s) @ got.vh, mat, atol=1e-12)


def _pareto(rng, alpha: float, xmin: float, n: int) -> np.ndarray:
    return xmin * (1.0 - rng.random(n)) ** (-1.0 / (alpha - 1.0))


@pytest.mark.parametrize("alpha", [2.0, 2.5, 3.5])
def test_powerlaw_alpha_recovers_exponent(alpha):
    rng = np.random.default_rng(int(alpha * 10))
    # a non-power-law body below x_min = 1 makes the KS scan choose x_min, not just the MLE
    x = np.concatenate([_pareto(rng, alpha, 1.0, 4000), rng.uniform(0.05, 1.0, 2000)])
    fit = fit_powerlaw(x, RMTConfig(alpha_max_points=10_000))
    assert abs(fit.alpha - alpha) < 0.1
    assert 0.7 < fit.xmin < 1.5


def test_powerlaw_mle_literal_formula():
    x = np.array([1.0, 1.5, 2.0, 3.0, 7.0, 0.5])
    total = 0.0
    n = 0
    for xi in x:
        if xi >= 1.0:
            total += math.log(xi / 1.0)
            n += 1
    assert math.isclose(powerlaw_mle(x, 1.0), 1.0 + n / total)


def test_mp_density_integrates_to_one_and_quantiles_invert():
    from scipy.integrate import quad
    for ratio in (0.25, 1.0, 3.0):
        lo, hi = (1 - math.sqrt(ratio)) ** 2, (1 + math.sqrt(ratio)) ** 2
        mass, _ = quad(lambda v: float(mp_density(np.array([v]), ratio, 1.0)[0]), lo, hi, limit=200)
        assert abs(mass - 1.0) < 1e-3
        median = float(mp_quantile(np.array([0.5]), ratio)[0])
        half, _ = quad(lambda v: float(mp_density(np.array([v]), ratio, 1.0)[0]), lo, median, limit=200)
        assert abs(half - 0.5) < 2e-3


@pytest.mark.parametrize("rows,cols", [(200, 400), (300, 150), (256, 256), (64, 576)])
def test_mp_fit_gaussian_has_no_spikes(rows, cols):
    for seed in range(3):
        w = np.random.default_rng(seed).normal(0.0, 0.3, (rows, cols))
        fit = fit_marchenko_pastur(esd(np.linalg.svd(w, compute_uv=False), rows), rows, cols)
        assert fit.spikes == 0
        assert abs(fit.variance / 0.09 - 1.0) < 0.05


def test_mp_fit_finds_planted_spikes():
    rng = np.random.default_rng(7)
    rows, cols = 200, 400
    w = rng.normal(0.0, 1.0, (rows, cols))
    u = np.linalg.qr(rng.normal(size=(rows, 3)))[0]
    v = np.linalg.qr(rng.normal(size=(cols, 3)))[0]
    w += u @ np.diag([60.0, 80.0, 110.0]) @ v.T  # bulk edge sigma ~ sqrt(200) + sqrt(400) = 34
    fit = fit_marchenko_pastur(esd(np.linalg.svd(w, compute_uv=False), rows), rows, cols)
    assert fit.spikes == 3
    assert abs(fit.variance - 1.0) < 0.05


def test_stable_and_effective_rank_literal():
    s = np.array([4.0, 2.0, 1.0, 0.5, 0.0])
    fro2 = sum(v * v for v in s)
    assert math.isclose(stable_rank(s), fro2 / 16.0)
    total = sum(s)
    entropy = -sum((v / total) * math.log(v / total) for v in s if v > 0)
    assert math.isclose(effective_rank(s), math.exp(entropy))
    assert math.isclose(effective_rank(np.ones(7)), 7.0)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 5, stride=2, padding=2)
        self.pool = nn.MaxPool2d(2)
        self.block = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=2))
        self.unused = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.block(self.pool(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


def test_hooks_find_input_resolution_per_layer():
    layers = discover_layers(SmallCNN(), WeightsConfig(input_size=(64, 48)))
    got = {layer.name: layer.input_hw for layer in layers}
    assert got == {"stem": (64, 48), "block.0": (16, 12), "block.2": (16, 12), "head": None, "unused": None}
    assert [layer.name for layer in layers][:4] == ["stem", "block.0", "block.2", "head"]
    assert layers[2].groups == 2 and layers[2].stride == (2, 2)


def test_layer_patterns_and_clear_error():
    assert [n for n, _ in select_layers(SmallCNN(), "block.*,head")] == ["block.0", "block.2", "head"]
    with pytest.raises(ValueError, match="matches none"):
        select_layers(SmallCNN(), "layer9.*")


def test_analyse_model_rows_and_permuted_baseline():
    torch.manual_seed(0)
    model = SmallCNN()
    results = analyse_model(model, WeightsConfig(input_size=(32, 32), dtype="float64"))
    rows = {r.info.name: layer_row(r) for r in results}
    stem = rows["stem"]
    for key in ("unfolded_alpha", "operator_stable_rank", "unfolded_perm_mp_spikes", "operator_perm_spectral_norm"):
        assert key in stem
    # permuting entries keeps the Frobenius norm of the unfolded matrix
    assert math.isclose(stem["unfolded_frobenius_norm"], stem["unfolded_perm_frobenius_norm"], rel_tol=1e-9)
    assert "operator" not in {k.split("_")[0] for k in rows["unused"] if k.endswith("alpha")}
    assert "not reached" in rows["unused"]["notes"]
    w = model.stem.weight.detach()
    assert torch.equal(permuted_weight(w, 0, "stem"), permuted_weight(w, 0, "stem"))
    assert torch.equal(permuted_weight(w, 0, "stem").flatten().sort().values, w.flatten().sort().values)
    assert not torch.equal(permuted_weight(w, 0, "stem"), w)


def test_structure_shows_against_permuted_baseline():
    """A layer with planted low-rank structure has spikes; its permuted copy has none."""
    gen = torch.Generator().manual_seed(5)
    conv = nn.Conv2d(64, 128, 3, bias=False)
    w = torch.randn(128, 64 * 9, generator=gen) * 0.02
    w += 0.6 * torch.randn(128, 2, generator=gen) @ torch.randn(2, 64 * 9, generator=gen) / 24.0
    conv.weight.data = w.reshape(128, 64, 3, 3)
    results = analyse_model(nn.Sequential(conv), WeightsConfig(input_size=(8, 8)))
    stats = results[0].stats
    assert stats["unfolded"]["mp_spikes"] == 2
    assert stats["unfolded_perm"]["mp_spikes"] == 0


def test_run_weights_analysis_writes_outputs(tmp_path):
    torch.manual_seed(0)
    models = {"a": SmallCNN(), "b": SmallCNN()}
    run_weights_analysis(models, 32, tmp_path, "*", WeightsConfig(top_k=4))
    for name in ("a", "b"):
        for f in ("weights.csv", "weights.json", "vectors.npz", "esd.png", "filters.png"):
            assert (tmp_path / name / f).stat().st_size > 0
        table = json.loads((tmp_path / name / "weights.json").read_text())
        assert [r["name"] for r in table] == ["stem", "block.0", "block.2", "head", "unused"]
        vec = np.load(tmp_path / name / "vectors.npz")
        assert vec["stem/vh"].shape == (4, 3 * 5 * 5)
    assert (tmp_path / "depth.png").stat().st_size > 0
    compare = json.loads((tmp_path / "compare.json").read_text())
    assert "a:unfolded_alpha" in compare[0] and "b:operator_stable_rank" in compare[0]
    assert json.loads((tmp_path / "weights.json").read_text())["config"]["weights"]["input_size"] == [32, 32]


def test_weights_command_end_to_end(tmp_path):
    """Real checkpoints through the one evaluate loader; --out is required and --layers is checked before
    anything is written."""
    from click.testing import CliRunner
    from rankshard.evaluate.cli import main
    from rankshard.train.checkpoint import checkpoint_payload, save_checkpoint
    from rankshard.train.models import build_model

    ckpts = []
    for seed, name in enumerate(("m1", "m2")):
        torch.manual_seed(seed)
        model = build_model("resnet18", "cifar", 10, width=4)
        ckpts.append(str(save_checkpoint(tmp_path / f"{name}.pt", checkpoint_payload(model))))
    out = tmp_path / "report"
    args = ["weights", *ckpts, "--layers", "conv1,layer1.0.*", "--top-k", "3", "--workers", "1", "--no-permuted"]
    res = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "m1: 3 layers analysed at 32x32" in res.output
    assert (out / "compare.csv").exists() and (out / "m2" / "filters.png").exists()
    result = json.loads((out / "weights.json").read_text())
    assert result["kind"] == "weights" and result["config"]["weights"]["input_size"] == [32, 32]
    assert [r["layer"] for r in result["tables"]["m1"]] == ["conv1", "layer1.0.conv1", "layer1.0.conv2"]
    assert all((out / f).is_file() for f in result["figures"] + result["files"])
    bad = CliRunner().invoke(main, ["weights", ckpts[0], "--layers", "nope", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "matches none" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "bad").exists()  # validated before writing
    missing = CliRunner().invoke(main, ["weights", ckpts[0]])
    assert missing.exit_code == 2 and "--out" in missing.output


def test_gram_svdvals_match_numpy_on_rank_deficient_batches():
    """Near-zero singular values are where squaring hurts most: still within 1e-7 of the largest."""
    gen = torch.Generator().manual_seed(5)
    low = torch.randn(4, 7, 2, generator=gen, dtype=torch.float64) @ torch.randn(4, 2, 9, generator=gen,
                                                                               dtype=torch.float64)
    cplx = torch.complex(torch.randn(3, 9, 5, generator=gen, dtype=torch.float64),
                         torch.randn(3, 9, 5, generator=gen, dtype=torch.float64))
    for mats in (low, low.mT, cplx, cplx.mT):
        ref = np.linalg.svd(mats.numpy(), compute_uv=False)[..., ::-1]
        got = gram_svdvals(mats).numpy()
        np.testing.assert_allclose(got, ref, atol=1e-7 * ref.max(), rtol=0)


def test_layers_in_parallel_give_the_same_rows_in_the_same_order():
    torch.manual_seed(1)
    model = SmallCNN()
    cfg = WeightsConfig(input_size=(32, 32))
    one = [layer_row(r) for r in analyse_model(model, cfg, workers=1)]
    three = [layer_row(r) for r in analyse_model(model, cfg, workers=3)]
    def strip(rows):  # timings differ; json makes the NaN of too-short spectra compare equal
        return json.dumps([{k: v for k, v in r.items() if k != "seconds"} for r in rows])

    assert strip(one) == strip(three)


@pytest.mark.parametrize("size", ["0", "-5"])
def test_weights_command_refuses_a_non_positive_input_size(tmp_path, size):
    """--input-size 0 was silently replaced by the checkpoint's size and -5 crashed in torch with a traceback."""
    from click.testing import CliRunner
    from rankshard.evaluate.cli import main
    from rankshard.train.checkpoint import checkpoint_payload, save_checkpoint
    from rankshard.train.models import build_model

    ckpt = str(save_checkpoint(tmp_path / "m.pt", checkpoint_payload(build_model("resnet18", "cifar", 10, width=4))))
    res = CliRunner().invoke(main, ["weights", ckpt, "--input-size", size, "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "--input-size" in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "out").exists()
