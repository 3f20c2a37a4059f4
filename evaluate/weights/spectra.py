"""Singular values of convolutional and linear weights: the numeric core of ``rankshard-evaluate weights``.

Two spectra per layer:

* the **unfolded** SVD of ``W.reshape(out, in*kh*kw)`` (DeepDataProfiler), with its top singular vectors;
* the **operator** spectrum: every singular value of the convolution as a linear map on the ``H x W``
  input it actually sees in the network, with circular padding (Sedghi, Gupta, Long 2019). For stride 1
  the operator is block-diagonalised by the 2-D DFT: one ``out x in`` matrix per frequency. A stride
  ``s`` convolution is a stride-1 convolution over the ``s*s`` polyphase components of the input
  (``x[c, s*u + r, s*v + t]``), so the same FFT method applies to a kernel with ``in*s*s`` channels on an
  ``(H/s) x (W/s)`` grid. Dilation inserts zeros into the kernel; groups make the operator
  block-diagonal, one block per group. Padding only shifts the input circularly (an orthogonal map), so
  it leaves the singular values unchanged.

Real kernels have conjugate-symmetric DFTs, so only ``rfft2``'s half of the frequencies is decomposed and
each value is counted twice where its mirror frequency was dropped.
"""
from __future__ import annotations

import fnmatch
import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch
from torch import nn

from rankshard.evaluate.weights.layer_extras import LayerExtras, layer_extras
from rankshard.evaluate.weights.operator import LanczosConfig, resolve_padding
from rankshard.evaluate.weights.rmt import RMTConfig, spectrum_stats
from rankshard.preprocess.devices import torch_threads

Pair = tuple[int, int]


@dataclass(frozen=True)
class WeightsConfig:
    """Everything that decides the numbers of a weights analysis (dumped next to the outputs)."""
    input_size: Pair = (224, 224)  # H, W of the probe image used to find each layer's input resolution
    in_channels: int | None = None  # probe channels; None: the first Conv2d/Linear's in_channels
    layers: str = "*"  # comma-separated fnmatch patterns over module names, e.g. "layer1.*,fc"
    top_k: int = 8  # unfolded singular vectors kept per layer
    seed: int = 0  # permutation baseline: each layer's generator is seeded with seed ^ crc32(name)
    operator: bool = True  # compute the exact operator spectrum of each convolution
    permuted: bool = True  # also analyse a randomly permuted copy of every weight
    dtype: str = "float32"  # FFT precision (and per-frequency SVD precision for method="svd")
    # Per-frequency singular values: "svd" (LAPACK svdvals) or "gram" (float64 eigvalsh of the smaller Gram
    # matrix). Measured on ResNet-50 (2 shared vCPUs): gram 36.6 s vs svd 31.7 s for the whole analysis;
    # its complex128 matmul + eigvalsh only beat complex64 svdvals on wide stride-2 polyphase blocks.
    method: str = "svd"
    rmt: RMTConfig = field(default_factory=RMTConfig)
    # The zero-padded operator each Conv2d applies (layer_extras.py): top-k singular values by Lanczos.
    # 0 skips it: it costs hundreds of conv + conv_transpose passes per layer (see bench_operator.py).
    zero_top_k: int = 0
    zero_dtype: str = "float64"  # precision of those passes; float32 is ~4x faster on CPU, ~1e-6 relative
    lanczos: LanczosConfig = field(default_factory=LanczosConfig)
    device: str = "cpu"  # where the zero-padded operator runs ("cuda" for a GPU)
    sensitivity: bool = False  # per-filter d sigma_max / d W (unfolded; operator too when zero_top_k > 0)
    ww_conventions: bool = False  # also fit alpha as WeightWatcher does (ww.py): ww_* columns

    def __post_init__(self) -> None:
        if self.dtype not in _COMPLEX:
            raise ValueError(f"WeightsConfig.dtype={self.dtype!r}: use one of {sorted(_COMPLEX)}")
        if self.method not in SVDVALS_METHODS:
            raise ValueError(f"WeightsConfig.method={self.method!r}: use one of {sorted(SVDVALS_METHODS)}")
        if self.zero_dtype not in _REAL:
            raise ValueError(f"WeightsConfig.zero_dtype={self.zero_dtype!r}: use one of {sorted(_REAL)}")
        if self.zero_top_k < 0:
            raise ValueError(f"WeightsConfig.zero_top_k={self.zero_top_k}: must be >= 0 (0 skips the operator)")
        if self.top_k < 0:
            raise ValueError(f"WeightsConfig.top_k={self.top_k}: must be >= 0")


_COMPLEX = {"float32": torch.complex64, "float64": torch.complex128}
_REAL = {"float32": torch.float32, "float64": torch.float64}


# Batched LAPACK on small matrices: single-threaded by default. MKL's threaded cgesdd spins at barriers:
# on a shared 2-vCPU machine a 420 x 128 x 512 batch took 49 s with two threads, 2.4-3 s with one.
lapack_threads = torch_threads


def as_pair(v: int | tuple[int, ...]) -> Pair:
    """``3 -> (3, 3)``; ``(3, 5) -> (3, 5)``."""
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


# ---------------------------------------------------------------------------------------------------------
# Unfolded SVD


@dataclass(frozen=True)
class UnfoldedSVD:
    """Thin SVD of ``W.reshape(out, -1)``: ``u [out, r]``, ``s [r]`` descending, ``vh [r, in*kh*kw]``."""
    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor


def unfold_svd(weight: torch.Tensor, dtype: torch.dtype = torch.float64) -> UnfoldedSVD:
    """DeepDataProfiler's SVD of a conv (or linear) weight: rows are output channels, columns the rest."""
    mat = weight.detach().reshape(weight.shape[0], -1).to(dtype)
    with lapack_threads(1):
        if mat.shape[0] < mat.shape[1]:
            # Same factors, from the tall transpose: LAPACK's tall path (QR first) is 2-3x faster on the
            # wide 512 x 4608 unfoldings of a ResNet-50 (measured 0.90 s -> 0.39 s, float64, one thread).
            v, s, uh = torch.linalg.svd(mat.T, full_matrices=False)
            return UnfoldedSVD(uh.T, s, v.T)
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    return UnfoldedSVD(u, s, vh)


# ---------------------------------------------------------------------------------------------------------
# Operator spectrum


def dilate_kernel(weight: torch.Tensor, dilation: Pair) -> torch.Tensor:
    """The equivalent undilated kernel: taps spread ``dilation`` apart, zeros in between."""
    dh, dw = dilation
    if (dh, dw) == (1, 1):
        return weight
    o, c, kh, kw = weight.shape
    out = weight.new_zeros(o, c, (kh - 1) * dh + 1, (kw - 1) * dw + 1)
    out[:, :, ::dh, ::dw] = weight
    return out


def polyphase_kernel(weight: torch.Tensor, stride: Pair) -> torch.Tensor:
    """Stride-``s`` kernel ``[o, c, kh, kw]`` -> stride-1 kernel ``[o, c*sh*sw, ceil(kh/sh), ceil(kw/sw)]``.

    Tap ``a = sh*q + r`` of the strided conv reads ``x[s*i + a] = x_r[i + q]`` where ``x_r`` is polyphase
    component ``r`` of the input, so channel ``(c, r, t)`` of the new kernel holds taps ``W[:, c, sh*q+r, sw*p+t]``.
    """
    sh, sw = stride
    o, c, kh, kw = weight.shape
    qh, qw = -(-kh // sh), -(-kw // sw)
    padded = weight.new_zeros(o, c, qh * sh, qw * sw)
    padded[:, :, :kh, :kw] = weight
    blocks = padded.reshape(o, c, qh, sh, qw, sw).permute(0, 1, 3, 5, 2, 4)
    return blocks.reshape(o, c * sh * sw, qh, qw)


def fold_kernel(kernel: torch.Tensor, grid: Pair) -> torch.Tensor:
    """Wrap taps beyond the ``grid`` (a kernel larger than the input) onto it, as circular padding does."""
    m1, m2 = grid
    *lead, kh, kw = kernel.shape
    if kh <= m1 and kw <= m2:
        return kernel
    ph, pw = -(-kh // m1) * m1, -(-kw // m2) * m2
    padded = kernel.new_zeros(*lead, ph, pw)
    padded[..., :kh, :kw] = kernel
    return padded.reshape(*lead, ph // m1, m1, pw // m2, m2).sum(dim=(-4, -2))


def gram_svdvals(mats: torch.Tensor) -> torch.Tensor:
    """Singular values (ascending) of a batch ``[..., m, n]`` as square roots of the eigenvalues of the
    smaller Gram matrix (``A A^H`` or ``A^H A``, Hermitian), formed and decomposed in float64.

    Only eigenvalues are needed, and a Hermitian eigensolver on the small side of a wide block is cheaper
    than an SVD of the block (square blocks: about the same as complex64 svdvals, measured). Squaring loses precision only near zero: eigenvalue errors are ~eps*||A||^2, so a singular
    value is off by at most ~sqrt(n*eps)*||A|| (about 1e-7 of the largest in float64): inside the 1e-5
    (relative to the largest) the operator spectra promise. Negative rounding noise is clamped to 0.
    """
    a = mats.to(torch.complex128 if mats.is_complex() else torch.float64)
    gram = a @ a.mH if a.shape[-2] <= a.shape[-1] else a.mH @ a
    return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()


SVDVALS_METHODS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gram": gram_svdvals,
    "svd": torch.linalg.svdvals,  # LAPACK SVD in the input's precision (complex64 for dtype float32)
}


def _matrix_spectrum(kernel: torch.Tensor, grid: Pair, cdtype: torch.dtype, method: str) -> torch.Tensor:
    """A 1x1 kernel: the same ``o x c`` matrix at every frequency, so its values repeat ``m1*m2`` times."""
    mats = kernel[..., 0, 0].to(_REAL_OF[cdtype])
    s = SVDVALS_METHODS[method](mats).reshape(-1)
    return s.repeat_interleave(grid[0] * grid[1])


def _fft_spectrum(kernel: torch.Tensor, grid: Pair, cdtype: torch.dtype, method: str) -> torch.Tensor:
    """Per-frequency singular values of ``rfft2`` of the kernel (``[g, o, c, kh, kw]``) on an ``m1 x m2`` grid."""
    m1, m2 = grid
    real = _REAL_OF[cdtype]
    spec = torch.fft.rfft2(fold_kernel(kernel.to(real), grid), s=(m1, m2))  # [g, o, c, m1, m2//2+1]
    mats = spec.permute(0, 3, 4, 1, 2).to(cdtype).contiguous()  # [g, m1, cols, o, c]: batched matmul needs it
    s = SVDVALS_METHODS[method](mats)  # [g, m1, cols, min(o, c)]
    # Column 0 and (for even m2) column m2/2 contain their own mirrors; every other column stands for two.
    mult = torch.full((s.shape[2],), 2, dtype=torch.long)
    mult[0] = 1
    if m2 % 2 == 0:
        mult[-1] = 1
    return s.repeat_interleave(mult, dim=2).reshape(-1)


_REAL_OF = {torch.complex64: torch.float32, torch.complex128: torch.float64}
_SPECTRUM_IMPLS: dict[bool, Callable[[torch.Tensor, Pair, torch.dtype, str], torch.Tensor]] = {
    True: _matrix_spectrum,  # keyed by "is the stride-1 kernel 1x1?"
    False: _fft_spectrum,
}


def operator_grid(n: int | Pair, stride: int | Pair) -> Pair:
    """The polyphase grid ``(H/sh, W/sw)``; a clear error when the stride does not divide the input."""
    (h, w), (sh, sw) = as_pair(n), as_pair(stride)
    if h % sh or w % sw:
        raise ValueError(
            f"input {h}x{w} is not divisible by stride {sh}x{sw}: the circular strided operator is only "
            f"defined when it is; choose an input size whose resolution at this layer is a multiple of the stride")
    return h // sh, w // sw


def conv_operator_svdvals(weight: torch.Tensor, n: int | Pair, stride: int | Pair = 1,
                          dilation: int | Pair = 1, groups: int = 1,
                          dtype: torch.dtype = torch.complex128, method: str = "svd") -> torch.Tensor:
    """All singular values (descending, with multiplicity) of a circular Conv2d on an ``n x n`` input.

    ``weight`` is ``[out, in/groups, kh, kw]`` as in ``nn.Conv2d``; ``n`` an int or ``(H, W)``; ``dtype``
    the complex dtype of the FFT (and of the per-frequency SVDs for ``method="svd"``); ``method`` one of
    ``SVDVALS_METHODS`` (``"gram"``: float64 Hermitian eigenvalues of the smaller Gram matrix). The operator maps ``in*H*W`` to ``out*(H/s)*(W/s)``
    values and the result has ``groups * (H/s)*(W/s) * min(out/groups, in*s*s/groups)`` entries.
    """
    grid = operator_grid(n, stride)
    o, c = weight.shape[:2]
    if o % groups:
        raise ValueError(f"weight with {o} output channels cannot be split into groups={groups}")
    kernel = dilate_kernel(weight.detach(), as_pair(dilation))
    kernel = polyphase_kernel(kernel, as_pair(stride))
    kernel = kernel.reshape(groups, o // groups, *kernel.shape[1:])
    kernel, dropped_zeros = drop_zero_channels(kernel, grid)
    impl = _SPECTRUM_IMPLS[tuple(kernel.shape[-2:]) == (1, 1)]
    with lapack_threads(1):
        values = impl(kernel, grid, dtype, method)
    values = torch.cat([values, values.new_zeros(dropped_zeros)])
    return torch.sort(values, descending=True).values


def drop_zero_channels(kernel: torch.Tensor, grid: Pair) -> tuple[torch.Tensor, int]:
    """Remove input channels that are zero in every group, output and tap; return how many zero singular
    values that removes. A kernel smaller than its stride (a strided 1x1 downsample) leaves most polyphase
    channels empty: a 2048 x 4096 block becomes 2048 x 1024 with the same nonzero singular values.
    """
    g, o, c = kernel.shape[:3]
    keep = kernel.ne(0).any(dim=4).any(dim=3).any(dim=1).any(dim=0)
    if bool(keep.all()):
        return kernel, 0
    kept = int(keep.sum())
    return kernel[:, :, keep], g * grid[0] * grid[1] * (min(o, c) - min(o, kept))


def operator_block_shape(weight: torch.Tensor, stride: int | Pair, groups: int) -> Pair:
    """(rows, cols) of one per-frequency block: ``out/groups x in_per_group*sh*sw``."""
    sh, sw = as_pair(stride)
    return weight.shape[0] // groups, weight.shape[1] * sh * sw


# ---------------------------------------------------------------------------------------------------------
# Layer discovery


@dataclass(frozen=True)
class LayerInfo:
    """One Conv2d or Linear layer, with the input resolution a forward pass showed it."""
    index: int  # depth: order of the first call in the probe forward pass (unreached layers come last)
    name: str
    kind: str  # "conv" or "linear"
    weight: torch.Tensor
    stride: Pair
    dilation: Pair
    groups: int
    input_hw: Pair | None  # None for linear layers and for convolutions the probe never reached
    calls: int  # forward calls during the probe (a module reused at two resolutions is analysed at the first)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)  # zeros added (top, bottom, left, right) by the conv
    padding_mode: str = "zeros"


_KINDS: dict[type, str] = {nn.Conv2d: "conv", nn.Linear: "linear"}


def _kind(module: nn.Module) -> str | None:
    return next((k for t, k in _KINDS.items() if isinstance(module, t)), None)


def select_layers(model: nn.Module, patterns: str = "*") -> list[tuple[str, nn.Module]]:
    """(name, module) of every Conv2d/Linear whose name matches one of the comma-separated fnmatch patterns."""
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    found = [(n, m) for n, m in model.named_modules() if _kind(m) is not None]
    chosen = [(n, m) for n, m in found if any(fnmatch.fnmatchcase(n, p) for p in pats)]
    if not chosen:
        names = ", ".join(n for n, _ in found[:8])
        raise ValueError(f"--layers {patterns!r} matches none of the {len(found)} Conv2d/Linear layers "
                         f"(first names: {names}); use fnmatch patterns such as 'layer1.*' or '*conv1'")
    return chosen


def _probe_channels(model: nn.Module) -> int:
    first = next((m for m in model.modules() if _kind(m) is not None), None)
    if first is None:
        raise ValueError("model has no Conv2d or Linear layer to analyse")
    return first.in_channels if isinstance(first, nn.Conv2d) else first.in_features


@torch.no_grad()
def probe_inputs(model: nn.Module, modules: list[tuple[str, nn.Module]], input_size: Pair,
                 in_channels: int | None = None) -> dict[str, tuple[Pair | None, int, int]]:
    """Run one mid-grey image through ``model`` with forward hooks; name -> (input H x W, calls, order)."""
    seen: dict[str, list] = {}

    def hook(name: str):
        def record(_module, args, _output):
            hw = tuple(args[0].shape[-2:]) if args[0].dim() == 4 else None
            entry = seen.setdefault(name, [hw, 0, len(seen)])
            entry[1] += 1
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in modules]
    param = next(model.parameters())
    probe = torch.full((1, in_channels or _probe_channels(model), *input_size), 0.5,
                       dtype=param.dtype, device=param.device)
    was_training = model.training
    try:
        model.eval()
        model(probe)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {k: (v[0], v[1], v[2]) for k, v in seen.items()}


def discover_layers(model: nn.Module, cfg: WeightsConfig) -> list[LayerInfo]:
    """Selected Conv2d/Linear layers in forward order, each with the input resolution it sees."""
    modules = select_layers(model, cfg.layers)
    seen = probe_inputs(model, modules, as_pair(cfg.input_size), cfg.in_channels)
    unreached = len(modules)
    layers = []
    for pos, (name, m) in enumerate(modules):
        hw, calls, order = seen.get(name, (None, 0, unreached + pos))
        conv = isinstance(m, nn.Conv2d)
        layers.append(LayerInfo(
            index=order, name=name, kind=_kind(m), weight=m.weight.detach().cpu(),
            stride=as_pair(m.stride) if conv else (1, 1), dilation=as_pair(m.dilation) if conv else (1, 1),
            groups=m.groups if conv else 1, input_hw=hw if conv else None, calls=calls,
            padding=resolve_padding(m.padding, as_pair(m.kernel_size), as_pair(m.dilation)) if conv else (0, 0, 0, 0),
            padding_mode=m.padding_mode if conv else "zeros"))
    layers.sort(key=lambda layer: layer.index)
    return [replace(layer, index=i) for i, layer in enumerate(layers)]


# ---------------------------------------------------------------------------------------------------------
# Per-layer analysis


@dataclass(frozen=True)
class Spectrum:
    """Singular values (descending, with multiplicity) of one block structure ``rows x cols``."""
    svals: np.ndarray
    rows: int
    cols: int


@dataclass(frozen=True)
class LayerResult:
    """Statistics of one layer: ``stats[spectrum_name]`` for unfolded/operator, trained and permuted."""
    info: LayerInfo
    stats: dict[str, dict]
    spectra: dict[str, Spectrum]
    top: UnfoldedSVD  # top_k singular triplets of the unfolded trained weight (float32)
    notes: tuple[str, ...]
    seconds: float
    extras: LayerExtras = field(default_factory=lambda: LayerExtras({}))  # zero-padded operator etc.


def permuted_weight(weight: torch.Tensor, seed: int, name: str) -> torch.Tensor:
    """The same entries in a random order (seeded per layer name, so a layer's baseline never depends on
    which other layers were selected): same norm and entry distribution, no learned structure."""
    gen = torch.Generator().manual_seed(seed ^ zlib.crc32(name.encode()))
    flat = weight.reshape(-1)
    return flat[torch.randperm(flat.numel(), generator=gen)].reshape(weight.shape)


def _unfolded_spectrum(info: LayerInfo, weight: torch.Tensor, cfg: WeightsConfig) -> Spectrum:
    mat = weight.reshape(weight.shape[0], -1)
    tall = mat if mat.shape[0] >= mat.shape[1] else mat.T  # same values; LAPACK's tall path is faster
    with lapack_threads(1):
        s = torch.linalg.svdvals(tall.to(torch.float64)).numpy()
    return Spectrum(s, mat.shape[0], mat.shape[1])


def _conv_operator(info: LayerInfo, weight: torch.Tensor, cfg: WeightsConfig) -> Spectrum:
    if info.input_hw is None:
        raise ValueError("not reached by the probe forward pass, so its input resolution is unknown; "
                         "check --input-size or analyse the module on its own")
    s = conv_operator_svdvals(weight, info.input_hw, info.stride, info.dilation, info.groups,
                              _COMPLEX[cfg.dtype], cfg.method)
    rows, cols = operator_block_shape(weight, info.stride, info.groups)
    return Spectrum(s.to(torch.float64).numpy(), rows, cols)


_OPERATORS: dict[str, Callable[[LayerInfo, torch.Tensor, WeightsConfig, Spectrum], Spectrum]] = {
    "conv": lambda info, w, cfg, unfolded: _conv_operator(info, w, cfg),
    "linear": lambda info, w, cfg, unfolded: unfolded,  # a linear layer's operator is its matrix
}


def layer_spectra(info: LayerInfo, cfg: WeightsConfig,
                  trained_svals: torch.Tensor | None = None) -> tuple[dict[str, Spectrum], tuple[str, ...]]:
    """Named spectra of a layer (``unfolded``, ``operator`` and their ``*_perm`` baselines) plus notes.

    ``trained_svals``: the unfolded singular values of ``info.weight`` when the caller already has them.
    """
    weights = {"": info.weight}
    if cfg.permuted:
        weights["_perm"] = permuted_weight(info.weight, cfg.seed, info.name)
    spectra, notes = {}, []
    for suffix, w in weights.items():
        if suffix == "" and trained_svals is not None:
            unfolded = Spectrum(trained_svals.to(torch.float64).numpy(), w.shape[0], w[0].numel())
        else:
            unfolded = _unfolded_spectrum(info, w, cfg)
        spectra["unfolded" + suffix] = unfolded
        if not cfg.operator:
            continue
        try:
            spectra["operator" + suffix] = _OPERATORS[info.kind](info, w, cfg, unfolded)
        except ValueError as err:  # documented user-facing limits (unreached layer, stride not dividing)
            notes.append(f"operator{suffix}: {err}")
    if info.calls > 1:
        notes.append(f"called {info.calls} times in the probe; operator taken at the first input {info.input_hw}")
    return spectra, tuple(dict.fromkeys(notes))


def analyse_layer(info: LayerInfo, cfg: WeightsConfig) -> LayerResult:
    """Spectra, RMT statistics and top unfolded singular vectors of one layer."""
    t0 = time.perf_counter()
    full = unfold_svd(info.weight)
    spectra, notes = layer_spectra(info, cfg, full.s)
    stats = {k: spectrum_stats(sp.svals, sp.rows, sp.cols, cfg.rmt) for k, sp in spectra.items()}
    extras, extra_notes = layer_extras(info, full, spectra, cfg)
    k = min(cfg.top_k, full.s.numel())
    top = UnfoldedSVD(full.u[:, :k].float(), full.s[:k].float(), full.vh[:k].float())
    return LayerResult(info, stats, spectra, top, notes + extra_notes, time.perf_counter() - t0, extras)


def analyse_model(model: nn.Module, cfg: WeightsConfig = WeightsConfig(), workers: int | None = None,
                  on_layer: Callable[[LayerResult], None] | None = None) -> list[LayerResult]:
    """Analyse every selected Conv2d/Linear layer of ``model``; results in forward order.

    Layers are independent, so they run on ``workers`` threads (default: one per core), each with
    single-threaded LAPACK: torch releases the GIL inside its kernels, and one thread per layer scales
    where MKL's own threading inside one small SVD did not (see ``lapack_threads``). ``on_layer`` sees each
    result as it arrives, in forward order (progress).
    """
    infos = discover_layers(model, cfg)
    results = []
    # set once here: per-call save/restore from several threads would race on the global setting
    with lapack_threads(1), ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        for result in pool.map(lambda info: analyse_layer(info, cfg), infos):
            results.append(result)
            if on_layer is not None:
                on_layer(result)
    return results


def layer_row(result: LayerResult) -> dict:
    """One flat table row: layer description then ``<spectrum>_<stat>`` columns."""
    info = result.info
    row = {
        "index": info.index, "name": info.name, "kind": info.kind,
        "shape": "x".join(map(str, info.weight.shape)),
        "stride": "x".join(map(str, info.stride)), "dilation": "x".join(map(str, info.dilation)),
        "groups": info.groups,
        "input_hw": "x".join(map(str, info.input_hw)) if info.input_hw else "",
    }
    for spec in ("unfolded", "operator", "unfolded_perm", "operator_perm"):
        for key, value in result.stats.get(spec, {}).items():
            row[f"{spec}_{key}"] = value
    row.update(result.extras.columns)
    row["seconds"] = round(result.seconds, 4)
    row["notes"] = "; ".join(result.notes)
    return row
