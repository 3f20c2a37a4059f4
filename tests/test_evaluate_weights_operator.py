"""The zero-padded operator, sensitivities, alpha reliability and WeightWatcher's conventions, against
independent references: dense float64 matrices built by applying nn.Conv2d to the identity basis, central
finite differences, literal loops and synthetic samples with known tails."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from rankshard.evaluate.weights.operator import (ConvGeometry, ConvOperator, LanczosConfig, conv_top_singular,
                                                 disjoint_top_singular, resolve_padding, top_singular)
from rankshard.evaluate.weights.rmt import RMTConfig, fit_powerlaw, ks_critical
from rankshard.evaluate.weights.sensitivity import operator_sigma_grad, unfolded_sigma_grads
from rankshard.evaluate.weights.spectra import (WeightsConfig, analyse_model, conv_operator_svdvals, layer_row,
                                                unfold_svd)
from rankshard.evaluate.weights.ww import ww_evals, ww_fit_powerlaw


def dense_module_matrix(conv: nn.Conv2d, hw: tuple[int, int]) -> torch.Tensor:
    """The layer as an explicit float64 matrix: the module itself (bias removed) applied to every basis image."""
    conv = conv.double()
    c = conv.in_channels
    basis = torch.eye(c * hw[0] * hw[1], dtype=torch.float64).reshape(-1, c, *hw)
    with torch.no_grad():
        out = conv(basis) - (conv(torch.zeros(1, c, *hw, dtype=torch.float64)) if conv.bias is not None else 0)
    return out.reshape(basis.shape[0], -1).T


ZERO_CASES = [
    # (out, in, k, (H, W), stride, padding, bias, dilation, groups)
    (4, 3, 3, (8, 6), 1, 1, True, 1, 1),
    (5, 3, 3, (9, 7), 2, 1, False, 1, 1),  # stride 2, odd input: output_padding restores the unread row
    (6, 4, 1, (8, 10), 2, 0, True, 1, 1),  # strided 1x1 (ResNet downsample), non-square input
    (3, 2, 5, (7, 10), 1, 2, False, 1, 1),
    (4, 4, 5, (12, 9), 2, 2, True, 1, 1),  # 5x5 stride 2
    (4, 4, 3, (10, 10), 1, 2, False, 2, 2),  # dilation and groups
    (3, 3, 4, (9, 8), 1, "same", False, 1, 1),  # even kernel: asymmetric 'same' padding
    (12, 2, 3, (6, 5), 1, 1, False, 1, 1),  # more outputs than inputs: Lanczos on the A A^T side
]


def _module(o, c, k, stride, padding, bias, dilation, groups, seed, mode="zeros"):
    torch.manual_seed(seed)
    return nn.Conv2d(c, o, k, stride=stride, padding=padding, bias=bias, dilation=dilation, groups=groups,
                     padding_mode=mode).double()


@pytest.mark.parametrize("o,c,k,hw,stride,padding,bias,dilation,groups", ZERO_CASES)
def test_zero_operator_topk_matches_dense_matrix(o, c, k, hw, stride, padding, bias, dilation, groups):
    conv = _module(o, c, k, stride, padding, bias, dilation, groups, seed=o * 10 + k)
    dense = dense_module_matrix(conv, hw)
    ref = torch.linalg.svdvals(dense)[:6]
    top = conv_top_singular(conv.weight, ConvGeometry.from_module(conv, hw), k=6,
                            cfg=LanczosConfig(basis=12, guard=2))  # small basis: forces restarts
    assert top.converged
    torch.testing.assert_close(top.s, ref, rtol=1e-6, atol=0)
    # the triplets are singular triplets of the dense matrix: A v = s u
    torch.testing.assert_close(top.v @ dense.T, top.s[:, None] * top.u, rtol=0, atol=1e-6 * float(ref[0]))


def _symmetric(w: torch.Tensor) -> torch.Tensor:
    """The kernel averaged over the square's 8 symmetries: on a square input its operator has exact pairs."""
    turns = [torch.rot90(w, r, (2, 3)) for r in range(4)]
    return sum(turns + [t.flip(3) for t in turns]) / 8


@pytest.mark.parametrize("case", ["symmetric kernel", "1x1 with padding", "dilation 3", "big grid", "1x3", "3x1"])
def test_zero_operator_finds_repeated_and_clustered_values(case):
    """Exact multiplicities (kernel symmetries, disjoint patches, dilation's independent sub-grids, a 1-D
    kernel's independent lines) and the tight clusters of a large grid, where a one-vector Krylov method
    would report each value once."""
    o, c, k, hw, pad, dil = {"symmetric kernel": (4, 4, 3, (8, 8), 1, 1), "1x1 with padding": (5, 3, 1, (6, 7), 1, 1),
                             "dilation 3": (3, 3, 3, (9, 9), 3, 3), "big grid": (3, 2, 3, (20, 20), 1, 1),
                             "1x3": (3, 3, (1, 3), (12, 12), (0, 1), 1),
                             "3x1": (3, 3, (3, 1), (12, 12), (1, 0), 1)}[case]
    conv = _module(o, c, k, 1, pad, False, dil, 1, seed=13)
    if case == "symmetric kernel":
        conv.weight.data = _symmetric(conv.weight.data)
    dense = dense_module_matrix(conv, hw)
    ref = torch.linalg.svdvals(dense)[:10]
    top = conv_top_singular(conv.weight, ConvGeometry.from_module(conv, hw), k=10, cfg=LanczosConfig(basis=30))
    assert top.converged
    torch.testing.assert_close(top.s, ref, rtol=1e-6, atol=0)
    if case != "big grid":  # the reference itself repeats: the test checks what it means to check
        assert float((ref[:-1] - ref[1:]).min()) <= 1e-9 * float(ref[0])


@pytest.mark.parametrize("o,c,k,hw,stride,padding,dilation,groups", [
    (6, 4, 1, (7, 9), 1, 0, 1, 1),  # 1x1: one block at every pixel, sigma_1 of W repeated 63 times
    (6, 4, 2, (7, 8), 2, 1, 1, 2),  # 2x2 stride 2 with a zero border: truncated edge and corner blocks; groups
    (4, 3, 2, (9, 9), 3, 1, 2, 1),  # dilated 2x2 (extent 3) at stride 3, padded
])
def test_disjoint_patches_are_exact_with_their_multiplicities(o, c, k, hw, stride, padding, dilation, groups):
    conv = _module(o, c, k, stride, padding, False, dilation, groups, seed=21)
    dense = dense_module_matrix(conv, hw)
    op = ConvOperator(conv.weight, ConvGeometry.from_module(conv, hw))
    assert op.disjoint_patches
    top = disjoint_top_singular(op, 12)
    ref = torch.linalg.svdvals(dense)[:12]
    torch.testing.assert_close(top.s, ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(top.v @ dense.T, top.s[:, None] * top.u, rtol=0, atol=1e-10)
    eye = torch.eye(12, dtype=torch.float64)
    torch.testing.assert_close(top.v @ top.v.T, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(top.u @ top.u.T, eye, rtol=0, atol=1e-12)


@pytest.mark.parametrize("o,c,k,hw,stride,padding,bias,dilation,groups", ZERO_CASES)
def test_adjoint_identity(o, c, k, hw, stride, padding, bias, dilation, groups):
    conv = _module(o, c, k, stride, padding, bias, dilation, groups, seed=3)
    op = ConvOperator(conv.weight, ConvGeometry.from_module(conv, hw))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, op.n_in, generator=gen, dtype=torch.float64)
    y = torch.randn(3, op.n_out, generator=gen, dtype=torch.float64)
    lhs = (op.matvec(x) * y).sum(dim=1)
    rhs = (x * op.rmatvec(y)).sum(dim=1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)
    assert op.out_shape == tuple(conv(torch.zeros(1, c, *hw, dtype=torch.float64)).shape[1:])


def test_circular_padding_mode_reproduces_the_fft_spectrum():
    """padding_mode='circular' with k//2 padding at stride 1 is the circular operator: both methods agree."""
    conv = _module(5, 4, 3, 1, 1, False, 1, 1, seed=7, mode="circular")
    top = conv_top_singular(conv.weight, ConvGeometry.from_module(conv, (8, 6)), k=5)
    ref = conv_operator_svdvals(conv.weight, (8, 6), 1, dtype=torch.complex128)[:5]
    torch.testing.assert_close(top.s, ref, rtol=1e-6, atol=0)


def test_resolve_padding_and_clear_errors():
    assert resolve_padding("same", (4, 3), (1, 2)) == (1, 2, 2, 2)
    assert resolve_padding("valid", (3, 3), (1, 1)) == (0, 0, 0, 0)
    with pytest.raises(ValueError, match="does not fit"):
        ConvGeometry(2, (2, 2)).output_hw((5, 5))
    with pytest.raises(ValueError, match="does not match in_channels"):
        ConvOperator(torch.zeros(3, 2, 3, 3), ConvGeometry(4, (5, 5)))


def _fd(f, w: torch.Tensor, direction: torch.Tensor, h: float) -> float:
    return (f(w + h * direction) - f(w - h * direction)) / (2 * h)


def test_unfolded_sensitivity_matches_finite_differences():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(6, 3, 3, 3, generator=gen, dtype=torch.float64)
    d = torch.randn(w.shape, generator=gen, dtype=torch.float64)
    svd = unfold_svd(w)
    grads = unfolded_sigma_grads(svd.u, svd.vh, w.shape, 3)
    for i in range(3):
        fd = _fd(lambda m: float(torch.linalg.svdvals(m.reshape(6, -1))[i]), w, d, 1e-5)
        assert math.isclose(float((grads[i] * d).sum()), fd, rel_tol=1e-4)


@pytest.mark.parametrize("stride,hw", [(1, (7, 6)), (2, (9, 8))])
def test_operator_sensitivity_matches_finite_differences(stride, hw):
    conv = _module(4, 3, 3, stride, 1, False, 1, 1, seed=11)
    geom = ConvGeometry.from_module(conv, hw)
    w = conv.weight.detach()
    d = torch.randn(w.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    op = ConvOperator(w, geom)
    grad = operator_sigma_grad(op, top_singular(op, 1))

    def sigma_max(weight):  # independent: the dense matrix of the perturbed layer
        conv.weight.data.copy_(weight)
        return float(torch.linalg.svdvals(dense_module_matrix(conv, hw))[0])
    fd = _fd(sigma_max, w.clone(), d, 1e-5)
    assert math.isclose(float((grad * d).sum()), fd, rel_tol=1e-4)


def _pareto(rng, alpha, n):
    return (1.0 - rng.random(n)) ** (-1.0 / (alpha - 1.0))


@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.5])
def test_alpha_reliable_on_pareto_samples(alpha):
    fit = fit_powerlaw(_pareto(np.random.default_rng(int(alpha * 10)), alpha, 3000))
    assert fit.reliable, fit.reason
    assert fit.reason == "" and abs(fit.alpha - alpha) < 0.15
    assert fit.ks <= fit.ks_critical == pytest.approx(ks_critical(fit.n_tail))


def test_alpha_unreliable_with_reason_on_tiny_and_flat_samples():
    tiny = fit_powerlaw(np.array([1.0, 2.0, 3.0, 5.0, 8.0]))
    assert math.isnan(tiny.alpha) and not tiny.reliable and "too few" in tiny.reason
    small = fit_powerlaw(_pareto(np.random.default_rng(0), 2.5, 30))
    assert not small.reliable and "tail of" in small.reason
    flat = fit_powerlaw(np.random.default_rng(1).uniform(1.0, 2.0, 2000))
    assert not flat.reliable and "outside" in flat.reason


def test_bootstrap_p_value_separates_power_law_from_lognormal():
    cfg = RMTConfig(alpha_bootstrap=40)
    rng = np.random.default_rng(3)
    good = fit_powerlaw(_pareto(rng, 2.5, 800), cfg)
    assert good.p_value >= 0.1 and good.reliable
    bad = fit_powerlaw(np.exp(rng.normal(0, 0.3, 3000)), cfg)
    assert not bad.reliable and bad.reason


def _ww_reference(evals: np.ndarray) -> tuple[float, float]:
    """WeightWatcher's fit as a literal loop over x_min candidates (one-sided KS, first minimum)."""
    x = np.sort(evals)
    best_d, best_alpha = np.inf, np.nan
    for i in range(x.size - 1):
        tail = x[i:]
        n = tail.size
        alpha = 1 + n / np.sum(np.log(tail / x[i]))
        d = np.max(np.abs(1 - (tail / x[i]) ** (1 - alpha) - np.arange(n) / n)) if alpha > 1 else 1.0
        if d < best_d:
            best_d, best_alpha = d, alpha
    return best_alpha, best_d


def test_ww_conventions_slices_and_fit():
    w = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    evals = ww_evals(w)
    ref = np.sort(np.concatenate([np.linalg.svd(w[:, :, i, j].numpy() * math.sqrt(0.5), compute_uv=False) ** 2
                                  for i in range(3) for j in range(3)]))
    np.testing.assert_allclose(evals, ref, rtol=1e-12)
    fit = ww_fit_powerlaw(evals)
    alpha, d = _ww_reference(evals)
    assert fit.alpha == pytest.approx(alpha, rel=1e-12) and fit.ks == pytest.approx(d, rel=1e-12)
    assert "WeightWatcher skips" in ww_fit_powerlaw(evals[:5]).reason


def test_ww_alpha_equals_weightwatcher():
    ww = pytest.importorskip("weightwatcher")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32, 64), nn.Linear(64, 48))
    details = ww.WeightWatcher(model=model).analyze(plot=False)
    ours = [ww_fit_powerlaw(ww_evals(m.weight)).alpha for m in model if isinstance(m, (nn.Conv2d, nn.Linear))]
    np.testing.assert_allclose(details["alpha"].to_numpy(), ours, rtol=1e-6)


def test_analyse_model_zero_operator_columns_and_sensitivity():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, stride=2, padding=1),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 5)).double()
    cfg = WeightsConfig(input_size=(8, 8), zero_top_k=3, sensitivity=True, ww_conventions=True, permuted=False)
    rows = [layer_row(r) for r in analyse_model(model, cfg, workers=1)]
    for row, conv in zip(rows[:2], (model[0], model[2])):  # both see 8x8 inputs
        ref = torch.linalg.svdvals(dense_module_matrix(conv, (8, 8)))[:3].numpy()
        got = np.array([float(v) for v in row["operator_zero_top"].split(";")])
        np.testing.assert_allclose(got, ref, rtol=1e-6)
        assert row["operator_circular_sigma_max"] == row["operator_spectral_norm"]  # backward-compatible key
        assert 0 <= row["sensitivity_operator_zero_top_share"] <= 1
        assert isinstance(row["unfolded_alpha_reliable"], bool) and isinstance(row["ww_alpha_reliable"], bool)
        for prefix in ("unfolded_", "ww_"):  # a NaN alpha always comes with its reason
            assert not math.isnan(row[prefix + "alpha"]) or row[prefix + "alpha_reason"]
    assert rows[2]["operator_zero_sigma_max"] == pytest.approx(float(torch.linalg.svdvals(model[4].weight)[0]))


def test_weights_command_zero_operator_outputs(tmp_path):
    from click.testing import CliRunner
    from evaluate_demo import tiny_checkpoint
    from rankshard.evaluate.cli import main

    ckpt = tiny_checkpoint(tmp_path / "m.pt", 0)
    out = tmp_path / "report"
    res = CliRunner().invoke(main, ["weights", ckpt, "--out", str(out), "--zero-top-k", "2", "--sensitivity",
                                    "--ww-conventions", "--no-permuted", "--input-size", "8", "--quiet", "--device", "auto",
                                    "--layers", "conv1,layer1.0.conv1,layer2.0.conv1,fc"])
    assert res.exit_code == 0, res.output
    folder = out / "m"
    assert (folder / "lipschitz.png").exists() and (folder / "sensitivity.png").exists()
    assert set(np.load(folder / "sensitivity.npz").files) >= {"conv1/operator_zero", "fc/unfolded"}
    header = (folder / "weights.csv").read_text().splitlines()[0].split(",")
    assert {"operator_zero_sigma_max", "operator_circular_sigma_max", "unfolded_alpha_reliable",
            "unfolded_alpha_reason", "ww_alpha"} <= set(header)
    # the result lists the new figures, so `report` shows them instead of dropping them silently
    import json
    result = json.loads((out / "weights.json").read_text())
    assert {"m/lipschitz.png", "m/sensitivity.png"} <= set(result["figures"]), result["figures"]


@pytest.mark.parametrize("o,c,k,hw,stride,padding,bias,dilation,groups", ZERO_CASES[:6])
def test_unfolded_norm_times_patch_count_bounds_the_operator(o, c, k, hw, stride, padding, bias, dilation, groups):
    """Each input pixel enters at most ceil(kh/sh)*ceil(kw/sw) patches (dilation does not add any), so
    ||A|| <= sqrt(that) * ||W_unfolded|| -- the bound the README quotes."""
    conv = _module(o, c, k, stride, padding, bias, dilation, groups, seed=9)
    sigma = float(torch.linalg.svdvals(dense_module_matrix(conv, hw))[0])
    blocks = conv.weight.reshape(groups, o // groups, -1)  # grouped: block-diagonal unfolded matrices
    unfolded = float(torch.linalg.svdvals(blocks).max())
    assert sigma <= math.ceil(k / stride) * unfolded * (1 + 1e-12)
