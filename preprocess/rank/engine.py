"""The rank engine: per-channel truncated SVD of image batches, several ranks from one decomposition.

Rank semantics are the SPEC's: each channel of an image ``x`` (values in [0, 1]) is an H x W matrix
``U diag(s) V^T``; low rank k is ``x_k = sum_{j<=k} s_j u_j v_j^T`` (k = 0 gives zeros, k >= n = min(H, W)
gives x itself), high rank k is ``x - x_k``.

Backends are small classes behind one method, ``factorize(a, k)``, chosen from ``BACKENDS`` by name:

* ``numpy``  -- float64 ``np.linalg.svd`` per matrix, Algorithm 1 literally (the reference; slow);
* ``torch``  -- batched float64 ``torch.linalg.svd`` (``torch-gesvd``/``-gesvda``/``-gesvdj``: CUDA drivers);
* ``gram64`` -- float64 Gram matrix of the smaller side + ``torch.linalg.eigh``; the projection
  ``x_k = (A V_k) V_k^T`` runs in float32, which costs ~1e-6 of accuracy and is ~6x faster than float64;
* ``cupy``   -- ``cupy.linalg.svd`` on CUDA through DLPack (imported only when used);
* ``randomized`` -- float32 randomized range finder + small SVD; approximate, needs ``kmax``, never auto.

``auto`` calibrates once per (H, W, device): it times the batched float64 backends (torch, its CUDA drivers,
gram64, cupy) on a small synthetic natural batch and keeps the fastest whose error against a float64
reference is 10x inside the accuracy bar (numpy, the literal loop, is the fallback).
"""
from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch

from rankshard.preprocess.devices import resolve_device, torch_threads

ACCURACY_BAR = 1e-4          # max-abs error on the [0, 1] scale vs the float64 reference (SPEC)
CPU_PREFERENCE = ("gram64", "torch32", "torch")  # fastest first (bench_rank_engine.py, 1 thread, 32x32 and 224x224)
CALIBRATION_MARGIN = 10.0    # auto wants error <= bar / margin on synthetic images: real photos are harder
CALIBRATION_PIXELS = 400_000  # pixels per channel summed over the calibration batch (~0.5 s at 224x224)
BAR_RANKS = (1, 5, 10, 30, 50, 100)


class Decomposition(NamedTuple):
    """Top-r SVD factors of every channel, float32: ``u [N,C,H,r]``, ``s [N,C,r]`` (descending), ``vh [N,C,r,W]``."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor


@dataclass
class RankOutputs:
    """Everything one ``materialize`` call produced (float32, on the input's device)."""

    low: dict[int, torch.Tensor]
    high: dict[int, torch.Tensor]
    spectra: torch.Tensor | None
    factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None


class _Factors(NamedTuple):
    """A backend's answer for a stack of matrices ``[B, h, w]``: ``left @ right`` (with s, see ``scaled``) = A_k.

    ``scaled`` says where the singular values already sit: ``"left"`` means ``left = U_k diag(s_k)``,
    ``"right"`` means ``right = diag(s_k) V_k^T``, ``"none"`` means plain ``U_k`` and ``V_k^T``.
    ``s`` holds every singular value for exact backends (length n) and only the top ones otherwise.
    """

    left: torch.Tensor
    s: torch.Tensor
    right: torch.Tensor
    scaled: Literal["left", "right", "none"]

    def transposed(self) -> _Factors:
        flip = {"left": "right", "right": "left", "none": "none"}[self.scaled]
        return _Factors(self.right.mT, self.s, self.left.mT, flip)

    def pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(left, right)`` whose product is A_k: multiplies s into the left factor when neither holds it."""
        if self.scaled == "none":
            return self.left * self.s[..., None, : self.left.shape[-1]].to(self.left.dtype), self.right
        return self.left, self.right


# -- backends -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _NumpySVD:
    """float64 ``np.linalg.svd`` one matrix at a time: the literal reference (slow, exact; auto's fallback)."""

    name: str = "numpy"
    dtype: str = "float64"
    auto: bool = False  # never faster than the batched float64 backends; not worth seconds of calibration
    exact: bool = True

    def available(self, device: torch.device) -> bool:
        return True

    def factorize(self, a: torch.Tensor, k: int) -> _Factors:
        mats = a.detach().to("cpu", torch.float64).numpy()
        parts = [np.linalg.svd(m, full_matrices=False) for m in mats]
        u, s, vh = (torch.from_numpy(np.stack([p[i] for p in parts])).to(a.device) for i in range(3))
        return _Factors(u[..., :k], s, vh[..., :k, :], "none")


@dataclass(frozen=True)
class _TorchSVD:
    """Batched float64 ``torch.linalg.svd``; factors handed on in float32 (reconstruction error ~1e-6)."""

    name: str = "torch"
    driver: str | None = None  # cuSOLVER driver ('gesvd', 'gesvda', 'gesvdj'); CUDA only
    dtype: str = "float64 svd, float32 reconstruction"
    auto: bool = True
    exact: bool = True
    precision: torch.dtype = torch.float64

    def available(self, device: torch.device) -> bool:
        return self.driver is None or device.type == "cuda"

    def factorize(self, a: torch.Tensor, k: int) -> _Factors:
        u, s, vh = torch.linalg.svd(a.to(self.precision), full_matrices=False, driver=self.driver)
        return _Factors(u[..., :k].float(), s.double(), vh[..., :k, :].float(), "none")


@dataclass(frozen=True)
class _Gram64:
    """Eigendecomposition of the float64 Gram matrix of the smaller side, float32 projection.

    Squaring the matrix squares its condition number, so the Gram matrix and eigh must be float64
    (float32 loses ~1e-2 on photos, SPEC); projecting onto the found basis is benign and runs in float32.
    """

    name: str = "gram64"
    dtype: str = "float64 gram+eigh, float32 projection"
    auto: bool = True
    exact: bool = True

    def available(self, device: torch.device) -> bool:
        return True

    def factorize(self, a: torch.Tensor, k: int) -> _Factors:
        if a.shape[-2] < a.shape[-1]:
            return self.factorize(a.mT, k).transposed()  # A = (A^T)^T: keep the Gram side small
        a64 = a.to(torch.float64)
        evals, evecs = torch.linalg.eigh(a64.mT @ a64)  # ascending
        s = evals.flip(-1).clamp_min(0).sqrt()
        v = evecs[..., evecs.shape[-1] - k:].flip(-1).float()  # top-k eigenvectors, descending
        return _Factors(a.float() @ v, s, v.mT, "left")


@dataclass(frozen=True)
class _CupySVD:
    """``cupy.linalg.svd`` in float64 on the CUDA device, tensors exchanged through DLPack."""

    name: str = "cupy"
    dtype: str = "float64 svd, float32 reconstruction"
    auto: bool = True
    exact: bool = True

    def available(self, device: torch.device) -> bool:
        return device.type == "cuda" and importlib.util.find_spec("cupy") is not None

    def factorize(self, a: torch.Tensor, k: int) -> _Factors:
        import cupy  # lazily: only CUDA machines with the [gpu] extra have it

        with cupy.cuda.Device(a.device.index or 0):
            u, s, vh = cupy.linalg.svd(cupy.from_dlpack(a.to(torch.float64).contiguous()), full_matrices=False)
        u, s, vh = (torch.from_dlpack(t) for t in (u, s, vh))
        return _Factors(u[..., :k].float(), s, vh[..., :k, :].float(), "none")


@dataclass(frozen=True)
class _Randomized:
    """float32 randomized truncated SVD (Halko et al.; like ``torch.svd_lowrank``): fast, approximate.

    Its error depends on the spectrum beyond ``k``, not on arithmetic precision, so it is never chosen by
    ``auto``; the benchmark reports how far it is from the reference.
    """

    name: str = "randomized"
    dtype: str = "float32 randomized"
    auto: bool = False
    exact: bool = False
    oversample: int = 10   # extra probe vectors beyond k
    power_iters: int = 2   # subspace iterations; each sharpens the spectral gap by (s_j / s_k)^2

    def available(self, device: torch.device) -> bool:
        return True

    def factorize(self, a: torch.Tensor, k: int) -> _Factors:
        a32 = a.float()
        width = min(k + self.oversample, *a.shape[-2:])
        gen = torch.Generator(device=a.device).manual_seed(0)
        probe = torch.randn(*a.shape[:-2], a.shape[-1], width, generator=gen, device=a.device)
        q = torch.linalg.qr(a32 @ probe).Q
        for _ in range(self.power_iters):
            q = torch.linalg.qr(a32 @ torch.linalg.qr(a32.mT @ q).Q).Q  # re-orthonormalize: float32 collapses
        ub, s, vh = torch.linalg.svd(q.mT @ a32, full_matrices=False)
        return _Factors((q @ ub)[..., :k], s[..., :k].double(), vh[..., :k, :], "none")


BACKENDS = {
    b.name: b
    for b in (
        _NumpySVD(),
        _TorchSVD(),
        _TorchSVD(name="torch-gesvd", driver="gesvd"),
        _TorchSVD(name="torch-gesvda", driver="gesvda"),
        _TorchSVD(name="torch-gesvdj", driver="gesvdj"),
        # float32 LAPACK. Measured vs float64 on scikit-image's photos (bench_rank_engine.py): 1.7e-6 at 32x32,
        # 2.5e-5 at 224x224, 5.7e-5 at 512x512 (1.2e-4 / 4.6e-4 with its text and checkerboard images), so
        # calibration's 10x margin admits it at small sizes only; on CPU gram64 is faster there anyway
        _TorchSVD(name="torch32", dtype="float32 svd", precision=torch.float32),
        _Gram64(),
        _CupySVD(),
        _Randomized(),
    )
}


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Names of the backends usable on ``device`` (default: CUDA if present, else CPU); ``auto`` not included."""
    dev = resolve_device(device)
    return [name for name, b in BACKENDS.items() if b.available(dev)]


# -- validation -----------------------------------------------------------------------------------------


def _validate_ranks(ranks, what: str = "rank") -> list[int]:
    """Ranks as a sorted list of distinct ints >= 0; a single int is accepted too."""
    items = [ranks] if isinstance(ranks, (int, np.integer)) else list(ranks)
    out = []
    for k in items:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise ValueError(f"{what} {k!r} is not an integer; ranks are whole numbers of singular values (>= 0)")
        if k < 0:
            raise ValueError(f"{what} {int(k)} is negative; ranks must be >= 0 (0 = all removed, n = full image)")
        out.append(int(k))
    return sorted(set(out))


def _as_batch(x) -> tuple[torch.Tensor, bool]:
    """``x`` as a float tensor [N, C, H, W]; also returns whether a [C, H, W] input was lifted to N = 1."""
    x = torch.as_tensor(x)
    if not x.is_floating_point():
        raise ValueError(f"expected a float image tensor in [0, 1], got dtype {x.dtype}; "
                         "convert uint8 images with x.float() / 255")
    if x.ndim not in (3, 4):
        raise ValueError(f"expected images shaped [N, C, H, W] or [C, H, W], got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("input images contain NaN or inf; the SVD of such a matrix is undefined")
    # contiguous: outputs are allocated like x and filled through flattened views, which a permuted
    # (e.g. channels-last, as from an HWC uint8 array) tensor would silently turn into copies
    x = x.contiguous()
    return (x[None], True) if x.ndim == 3 else (x, False)


# -- reconstruction -------------------------------------------------------------------------------------


def _incremental(left: torch.Tensor, right: torch.Tensor, ranks: list[int]) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(k, left[:, :, :k] @ right[:, :k])`` for sorted ranks, each from the previous plus one block.

    The yielded tensor is one reused buffer: the caller copies it before asking for the next rank.
    """
    acc = torch.zeros(*left.shape[:-1], right.shape[-1], dtype=left.dtype, device=left.device)
    prev = 0
    for k in ranks:
        if k > prev:
            acc.baddbmm_(left[..., prev:k], right[..., prev:k, :])
        prev = k
        yield k, acc


def _orthonormal_columns(m: torch.Tensor) -> torch.Tensor:
    """Columns of ``m`` scaled to unit length, via QR so that zero columns still get orthonormal vectors.

    For ``m = U diag(s)`` the QR factor is ``U`` up to column signs; the sign fix keeps ``u_j`` pointing
    along ``m_j``. Rank-deficient channels (s_j = 0) get an arbitrary orthonormal completion.
    """
    q, r = torch.linalg.qr(m.to(torch.float64))
    sign = torch.where(torch.diagonal(r, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(q.dtype)
    return q * sign[..., None, :]


def _singular_vectors(f: _Factors, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 ``(U_k [B,h,k], s_k [B,k], Vh_k [B,k,w])`` with orthonormal U and V from any ``_Factors``."""
    left, right = f.left[..., :k], f.right[..., :k, :]
    if f.scaled == "left":
        left = _orthonormal_columns(left)
    elif f.scaled == "right":
        right = _orthonormal_columns(right.mT).mT
    return left.float(), f.s[..., :k].float(), right.float()


def energy_retained(s: torch.Tensor, ranks) -> torch.Tensor:
    """Share of squared singular values kept by each rank: ``[..., len(ranks)]`` from spectra ``s [..., n]``.

    ``sum_{j<=k} s_j^2 / sum_j s_j^2`` per channel, in float64 arithmetic; an all-zero channel retains 1.0.
    """
    ks = [ranks] if isinstance(ranks, (int, np.integer)) else list(ranks)
    _validate_ranks(ks)  # the output keeps the caller's order and duplicates
    e = s.to(torch.float64) ** 2
    cum = torch.cat([torch.zeros_like(e[..., :1]), e.cumsum(-1)], dim=-1)  # cum[..., k] = sum_{j<=k}
    idx = torch.tensor([min(int(k), s.shape[-1]) for k in ks], device=s.device)
    total = cum[..., -1:]
    kept = cum.index_select(-1, idx)
    return torch.where(total > 0, kept / torch.where(total > 0, total, 1.0), 1.0).float()


def reference_low_rank(x: np.ndarray, k: int) -> np.ndarray:
    """Algorithm 1 literally, float64: per image, per channel ``np.linalg.svd``, then the sum of k rank-1 terms.

    ``x`` is [..., H, W] (e.g. [N, C, H, W]); k >= n sums all n terms.
    """
    (k,) = _validate_ranks([k])
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros_like(x)
    for idx in np.ndindex(*x.shape[:-2]):
        u, s, vh = np.linalg.svd(x[idx], full_matrices=False)
        for j in range(min(k, len(s))):
            out[idx] += s[j] * np.outer(u[:, j], vh[j])
    return out


# -- auto calibration -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """What ``auto`` measured for one (H, W, device): seconds and max-abs error per backend, and the pick."""

    chosen: str
    seconds: dict[str, float]
    errors: dict[str, float]


_CALIBRATIONS: dict[tuple[int, int, str], Calibration] = {}


@contextlib.contextmanager
def _intra_op_threads(device: torch.device, threads: int) -> Iterator[None]:
    """Temporarily set torch's CPU thread count (no-op on CUDA).

    LAPACK on matrices this small gains nothing from intra-op threads, and on a busy machine OpenMP's
    spinning threads make batched eigh/svd several times slower (measured 6x at 224x224 with load 7 on
    2 cores); one thread per worker over a split batch is never slower and uses the free cores.
    """
    if device.type != "cpu":
        yield
        return
    with torch_threads(threads):
        yield


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _low_ranks_of(f: _Factors, ranks: list[int]) -> dict[int, torch.Tensor]:
    """All low-rank reconstructions (ranks < n, sorted) of one ``_Factors`` as float64 copies."""
    return {k: xk.to(torch.float64, copy=True) for k, xk in _incremental(*f.pair(), ranks)}


def _time_backend(backend, a: torch.Tensor, ranks: list[int]) -> tuple[float, dict[int, torch.Tensor]]:
    backend.factorize(a[:1], 1)  # warm-up: first calls pay for library initialization
    _sync(a.device)
    start = time.perf_counter()
    lows = _low_ranks_of(backend.factorize(a, ranks[-1]), ranks)
    _sync(a.device)
    return time.perf_counter() - start, lows


def calibrate(height: int, width: int, device: str | torch.device | None = None) -> Calibration:
    """Time every auto-eligible backend on a synthetic natural batch of this size; cached per process.

    The pick is the fastest backend whose max-abs error against a float64 SVD reference, over the
    ranks {1, 5, 10, 30, 50, 100} below n, is within ``ACCURACY_BAR / CALIBRATION_MARGIN``.
    """
    from rankshard.preprocess.sources.synth import natural_batch  # the generator is only needed here

    dev = resolve_device(device)
    key = (height, width, str(dev))
    if key not in _CALIBRATIONS:
        n = min(height, width)
        ranks = [k for k in BAR_RANKS if k < n] or [n]
        count = max(1, min(32, CALIBRATION_PIXELS // (height * width)))
        a = torch.from_numpy(natural_batch(count, size=(height, width), seed=12345)).float().to(dev)
        a = a.reshape(-1, height, width)
        with _intra_op_threads(dev, 1):
            _CALIBRATIONS[key] = _measure(a, ranks)
    return _CALIBRATIONS[key]


def _measure(a: torch.Tensor, ranks: list[int]) -> Calibration:
    """Time and error of each auto-eligible backend on the matrices ``a``; pick the fastest good one."""
    # float64 LAPACK SVD with float64 reconstruction, batched: numpy's result to ~1e-13, without its loop
    u, sv, vh = torch.linalg.svd(a.to(torch.float64), full_matrices=False)
    ref = _low_ranks_of(_Factors(u, sv, vh, "none"), ranks)
    seconds, errors = {}, {}
    for name in available_backends(a.device):
        if BACKENDS[name].auto:
            seconds[name], lows = _time_backend(BACKENDS[name], a, ranks)
            errors[name] = max(float((lows[k] - ref[k]).abs().max()) for k in ranks)
    good = [name for name in seconds if errors[name] <= ACCURACY_BAR / CALIBRATION_MARGIN]
    if a.device.type == "cpu":
        # On shared CPUs timings are noise-prone, and two runs that pick different backends write
        # different bytes (float rounding flips PNG values). So the CPU pick is deterministic: the first
        # good backend in the order bench_rank_engine.py measured fastest.
        chosen = next((name for name in CPU_PREFERENCE if name in good), "numpy")
    else:
        chosen = min(good, key=seconds.__getitem__, default="numpy")
    return Calibration(chosen, seconds, errors)


# -- the engine -----------------------------------------------------------------------------------------


class RankEngine:
    """Low-rank, high-rank, spectra and factors of image batches, all from one SVD per channel.

    ``backend`` is a name from ``available_backends()`` or ``"auto"`` (calibrated per image size on first
    use). Work runs on ``device`` (default: CUDA if present); outputs return to the input's device.
    ``chunk_mb`` bounds the float64 working memory: batches are decomposed that many megabytes at a time.
    On CPU, chunks are spread over ``workers`` threads (default: torch's thread count), each running
    torch single-threaded for the duration of the call (see ``_intra_op_threads``).
    """

    def __init__(self, backend: str = "auto", device: str | torch.device | None = None, chunk_mb: int = 256,
                 workers: int | None = None):
        self.device = resolve_device(device)
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"unknown SVD backend {backend!r}; choose 'auto' or one of {sorted(BACKENDS)}")
        if backend != "auto" and not BACKENDS[backend].available(self.device):
            raise RuntimeError(f"SVD backend {backend!r} is not usable on {self.device}: CUDA backends need a GPU "
                               f"(cupy also `pip install rankshard[gpu]`); usable here: {available_backends(self.device)}")
        self.requested = backend
        self.backend_name = backend  # the concrete backend once 'auto' has been resolved for a size
        self.chunk_bytes = chunk_mb * 2**20
        self.workers = max(1, workers or torch.get_num_threads()) if self.device.type == "cpu" else 1
        self.auto_choices: dict[str, str] = {}

    @property
    def dtype(self) -> str:
        return BACKENDS[self.backend_name].dtype if self.backend_name in BACKENDS else "auto"

    def describe(self) -> dict:
        """``{"backend", "device", "dtype"}`` for the manifest's ``svd`` field (plus auto's picks per size)."""
        info = {"backend": self.backend_name, "device": str(self.device), "dtype": self.dtype}
        if self.requested == "auto":
            info["auto"] = dict(self.auto_choices)
        return info

    def _backend(self, h: int, w: int):
        if self.requested == "auto":
            self.backend_name = calibrate(h, w, self.device).chosen
            self.auto_choices[f"{h}x{w}"] = self.backend_name
        return BACKENDS[self.backend_name]

    def _chunks(self, batch: int, h: int, w: int) -> list[slice]:
        per_matrix = 8 * (3 * h * w + 3 * min(h, w) ** 2)  # float64 copy, Gram, eigenvectors, products
        step = max(1, min(self.chunk_bytes // (per_matrix * self.workers), -(-batch // self.workers)))
        return [slice(i, min(i + step, batch)) for i in range(0, batch, step)]

    def _map_chunks(self, batch: int, h: int, w: int, work: Callable[[slice], None]) -> None:
        """Run ``work`` on every chunk of a flattened batch of ``batch`` h x w matrices (threads on CPU)."""
        slices = self._chunks(batch, h, w)
        with _intra_op_threads(self.device, 1):
            if self.workers == 1 or len(slices) == 1:
                for sl in slices:
                    work(sl)
            else:
                with ThreadPoolExecutor(self.workers) as pool:
                    list(pool.map(work, slices))  # list(): re-raises a worker's exception here

    # -- public operations ----------------------------------------------------------------------------

    def materialize(self, x, low: Iterable[int] = (), high: Iterable[int] = (), factors: int | None = None,
                    spectra: bool = False) -> RankOutputs:
        """Low ranks, high ranks, top-``factors`` factors and/or full spectra of ``x``, from ONE decomposition.

        ``x`` is [N, C, H, W] (or [C, H, W]) in [0, 1]. Only the top max(rank < n) components are computed
        unless spectra are asked for (every backend returns all singular values then).
        """
        x4, lifted = _as_batch(x)
        low_r, high_r = _validate_ranks(low, "low rank"), _validate_ranks(high, "high rank")
        kf = None if factors is None else min(_validate_ranks([factors], "factors rank")[0], min(x4.shape[-2:]))
        out = _allocate(x4, low_r, high_r, kf, spectra)
        n = min(x4.shape[-2:])
        inner = sorted({k for k in low_r + high_r if 0 < k < n})
        kmax = max(inner + [kf or 0])
        if kmax or spectra:
            backend = self._backend(*x4.shape[-2:])
            flat = x4.reshape(-1, *x4.shape[-2:])

            def work(sl: slice) -> None:
                a = flat[sl].to(self.device)
                _fill_chunk(out, sl, backend.factorize(a, kmax) if kmax else None, a, inner)

            self._map_chunks(*flat.shape, work)
        return _squeeze(out) if lifted else out

    def low_rank(self, x, ranks) -> dict[int, torch.Tensor]:
        """``{k: x_k}`` for each rank (float32, input's device)."""
        return self.materialize(x, low=_validate_ranks(ranks)).low

    def high_rank(self, x, ranks) -> dict[int, torch.Tensor]:
        """``{k: x - x_k}`` for each rank (float32, input's device)."""
        return self.materialize(x, high=_validate_ranks(ranks)).high

    def decompose(self, x, kmax: int | None = None) -> Decomposition:
        """Top-``kmax`` (default: all n) singular triplets of every channel, float32, on the input's device."""
        x4, lifted = _as_batch(x)
        n_img, c, h, w = x4.shape
        r = min(h, w) if kmax is None else min(_validate_ranks([kmax], "kmax")[0], min(h, w))
        backend = self._backend(h, w)
        if kmax is None and not backend.exact:
            raise ValueError(f"SVD backend {backend.name!r} is approximate and needs kmax; pass decompose(x, kmax=k)")
        flat = x4.reshape(-1, h, w)
        u, s, vh = (torch.zeros(len(flat), *shape, device=x4.device) for shape in ((h, r), (r,), (r, w)))

        def work(sl: slice) -> None:
            u[sl], s[sl], vh[sl] = _singular_vectors(backend.factorize(flat[sl].to(self.device), r), r)

        if r:
            self._map_chunks(len(flat), h, w, work)
        dec = Decomposition(u.view(n_img, c, h, r), s.view(n_img, c, r), vh.view(n_img, c, r, w))
        return Decomposition(*(t[0] for t in dec)) if lifted else dec

    def reconstruct(self, dec: Decomposition, ranks) -> dict[int, torch.Tensor]:
        """``{k: x_k}`` from a decomposition, incrementally (x_{k2} = x_{k1} + the block k1..k2); float32.

        Ranks above the kept r are only allowed when r = n (they give the full reconstruction).
        """
        ranks = _validate_ranks(ranks)
        h, r, w = dec.u.shape[-2], dec.s.shape[-1], dec.vh.shape[-1]
        too_high = [k for k in ranks if k > r]
        if too_high and r < min(h, w):
            raise ValueError(f"rank {too_high[-1]} needs more components than the {r} this decomposition keeps; "
                             f"decompose with kmax >= {too_high[-1]}")
        lead = dec.s.shape[:-1]
        left = (dec.u * dec.s[..., None, :]).reshape(-1, h, r).float()
        built = {k: xk.clone() for k, xk in _incremental(left, dec.vh.reshape(-1, r, w).float(),
                                                         sorted({min(k, r) for k in ranks}))}
        return {k: built[min(k, r)].view(*lead, h, w) for k in ranks}


def _allocate(x4: torch.Tensor, low: list[int], high: list[int], kf: int | None, spectra: bool) -> RankOutputs:
    """Output tensors; ranks 0 and >= n are filled exactly here (zeros or a float32 copy of x)."""
    n_img, c, h, w = x4.shape
    n = min(h, w)
    x32 = x4.float().contiguous()

    def trivial(k: int, keep_x: bool) -> torch.Tensor:
        if k == 0 or k >= n:
            return x32.clone() if keep_x else torch.zeros_like(x32)
        return torch.empty_like(x32, memory_format=torch.contiguous_format)

    factors = None
    if kf is not None:
        factors = tuple(torch.empty(n_img, c, *shape, device=x4.device) for shape in ((h, kf), (kf,), (w, kf)))
    return RankOutputs(
        low={k: trivial(k, keep_x=k >= n) for k in low},
        high={k: trivial(k, keep_x=k == 0) for k in high},
        spectra=torch.empty(n_img, c, n, device=x4.device) if spectra else None,
        factors=factors,
    )


def _fill_chunk(out: RankOutputs, sl: slice, f: _Factors | None, a: torch.Tensor, inner: list[int]) -> None:
    """Write one chunk's share (matrices ``sl`` of the flattened batch) of every requested output."""
    n = min(a.shape[-2:])
    if out.spectra is not None:
        exact = f is not None and f.s.shape[-1] == n
        s = f.s if exact else torch.linalg.svdvals(a.to(torch.float64))  # spectra only, or an approximate backend
        out.spectra.flatten(0, 1)[sl] = s
    if out.factors is not None:
        kf = out.factors[1].shape[-1]
        u, s, vh = _singular_vectors(f, kf)
        for dst, src in zip(out.factors, (u, s, vh.mT)):
            dst.flatten(0, 1)[sl] = src  # outputs are contiguous [N, C, ...]: flatten is a view
    if not inner:
        return
    left, right = f.pair()
    base = a.to(left.dtype)
    for k, xk in _incremental(left, right, inner):
        if k in out.low:
            out.low[k].flatten(0, 1)[sl] = xk
        if k in out.high:
            out.high[k].flatten(0, 1)[sl] = base - xk


def _squeeze(out: RankOutputs) -> RankOutputs:
    """Drop the N = 1 axis added for a [C, H, W] input."""
    return RankOutputs(
        low={k: v[0] for k, v in out.low.items()},
        high={k: v[0] for k, v in out.high.items()},
        spectra=None if out.spectra is None else out.spectra[0],
        factors=None if out.factors is None else tuple(t[0] for t in out.factors),
    )
