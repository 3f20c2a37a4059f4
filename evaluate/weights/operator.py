"""The convolution the network actually applies, as a matrix-free linear operator, and its top singular values.

``rankshard.evaluate.weights.spectra`` computes every singular value of a convolution with **circular**
padding (exact and cheap through the FFT, Sedghi et al. 2019). A ``nn.Conv2d`` pads with **zeros** (unless
``padding_mode`` says otherwise): near the border its taps fall on zeros instead of wrapping around, so the
operator is a different matrix. Its largest singular value is the layer's exact Lipschitz constant in
ℓ2 on inputs of that resolution, and the circular value is neither an upper nor a lower bound of it in
general (measured on ResNet-50: see ``benchmarks/bench_operator.py``).

This module applies that operator with ``F.conv2d`` and its exact adjoint with ``F.conv_transpose2d``
(``output_padding`` restores the input rows a strided convolution never reads), and finds the top-k
singular triplets by a restarted block Lanczos iteration on the Gram operator ``A^T A`` (or ``A A^T``,
whichever side is smaller) with full reorthogonalisation, in float64 by default, on any device.

Conventions: the operator maps a ``[C, H, W]`` input (flattened row-major) to the ``[O, Ho, Wo]`` output;
bias is ignored (an affine shift does not change a Lipschitz constant); a module reused at several
resolutions is a different operator at each one, and this takes the resolution the probe saw first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Pair = tuple[int, int]
Pad4 = tuple[int, int, int, int]  # top, bottom, left, right


def _pair(v: int | tuple[int, ...]) -> Pair:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def resolve_padding(padding: int | tuple | str, kernel_hw: Pair, dilation: Pair) -> Pad4:
    """``nn.Conv2d``'s ``padding`` as explicit (top, bottom, left, right) counts.

    ``"same"`` pads ``d*(k-1)`` in total with the odd one at the bottom/right, as torch does.
    """
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        th, tw = (d * (k - 1) for d, k in zip(dilation, kernel_hw))
        return (th // 2, th - th // 2, tw // 2, tw - tw // 2)
    if isinstance(padding, str):
        raise ValueError(f"padding={padding!r}: use an int, a pair, 'same' or 'valid'")
    ph, pw = _pair(padding)
    return (ph, ph, pw, pw)


@dataclass(frozen=True)
class ConvGeometry:
    """Everything besides the kernel that fixes the linear map of a Conv2d."""
    in_channels: int
    input_hw: Pair
    stride: Pair = (1, 1)
    padding: Pad4 = (0, 0, 0, 0)
    dilation: Pair = (1, 1)
    groups: int = 1
    padding_mode: str = "zeros"  # "zeros" has a conv_transpose2d adjoint; other modes use autograd's

    @classmethod
    def from_module(cls, conv: nn.Conv2d, input_hw: Pair) -> "ConvGeometry":
        """The geometry of ``conv`` applied to an ``input_hw`` input."""
        dilation = _pair(conv.dilation)
        return cls(conv.in_channels, _pair(input_hw), _pair(conv.stride),
                   resolve_padding(conv.padding, _pair(conv.kernel_size), dilation), dilation, conv.groups,
                   conv.padding_mode)

    def output_hw(self, kernel_hw: Pair) -> Pair:
        """Output resolution: ``floor((H + pads - d(k-1) - 1) / s) + 1`` per axis."""
        t, b, left, r = self.padding
        sizes = []
        for n, pads, k, d, s in zip(self.input_hw, (t + b, left + r), kernel_hw, self.dilation, self.stride):
            span = n + pads - d * (k - 1) - 1
            if span < 0:
                raise ValueError(f"kernel {kernel_hw} with dilation {self.dilation} does not fit the "
                                 f"padded {self.input_hw} input")
            sizes.append(span // s + 1)
        return sizes[0], sizes[1]


class ConvOperator:
    """``x [b, C*H*W] -> conv(x) [b, O*Ho*Wo]`` and its adjoint, rows of a block being separate vectors."""

    def __init__(self, weight: torch.Tensor, geom: ConvGeometry, dtype: torch.dtype = torch.float64,
                 device: torch.device | str | None = None):
        if weight.dim() != 4 or weight.shape[1] * geom.groups != geom.in_channels:
            raise ValueError(f"weight {tuple(weight.shape)} does not match in_channels={geom.in_channels}, "
                             f"groups={geom.groups}")
        self.weight = weight.detach().to(dtype=dtype, device=device)
        self.geom = geom
        self.in_shape = (geom.in_channels, *geom.input_hw)
        self.out_shape = (weight.shape[0], *geom.output_hw(tuple(weight.shape[2:])))
        self.n_in, self.n_out = math.prod(self.in_shape), math.prod(self.out_shape)
        t, b, left, r = geom.padding
        # Symmetric zero padding goes through conv2d's own padding (no copy); anything else is an explicit
        # F.pad of the input, so the adjoint is conv_transpose2d without padding followed by a crop.
        self._builtin = geom.padding_mode == "zeros" and t == b and left == r

    @property
    def disjoint_patches(self) -> bool:
        """Stride >= the dilated kernel's extent (a 1x1 convolution, say): no input pixel feeds two outputs,
        so the operator applies one matrix per output pixel (see ``disjoint_top_singular``)."""
        kernel_hw = self.weight.shape[2:]
        return all(s >= d * (k - 1) + 1 for s, d, k in zip(self.geom.stride, self.geom.dilation, kernel_hw))

    @property
    def structural_multiplicity(self) -> int:
        """How often singular values may repeat, known from the geometry alone (a Krylov block that wide
        finds every copy). Per axis: an axis whose stride covers the dilated kernel splits into independent
        output lines (a 1x7 kernel applies one 1-D operator to every row: up to one copy per row), dilation d
        at stride 1 into d interleaved sub-grids; the axes' counts multiply."""
        g, m = self.geom, 1
        for s, d, k, n_out in zip(g.stride, g.dilation, self.weight.shape[2:], self.out_shape[1:]):
            m *= n_out if s >= d * (k - 1) + 1 else (d if s == 1 else 1)
        return m

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        t, b, left, r = self.geom.padding
        mode = "constant" if self.geom.padding_mode == "zeros" else self.geom.padding_mode
        return F.pad(x, (left, r, t, b), mode=mode)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        g = self.geom
        pad = (g.padding[0], g.padding[2]) if self._builtin else 0
        x = x if self._builtin else self._pad(x)
        return F.conv2d(x, weight, None, g.stride, pad, g.dilation, g.groups)

    def matvec(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``A x`` for each row of ``x [b, n_in]``; ``weight`` overrides the kernel (for autograd)."""
        out = self._conv(x.reshape(-1, *self.in_shape), self.weight if weight is None else weight)
        return out.reshape(x.shape[0], -1)

    def rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        """``A^T y`` for each row of ``y [b, n_out]``."""
        y = y.reshape(-1, *self.out_shape)
        if self.geom.padding_mode != "zeros":
            return self._autograd_adjoint(y)
        g = self.geom
        t, b, left, r = g.padding
        padded = (self.in_shape[1] + t + b, self.in_shape[2] + left + r)
        kernel_hw = self.weight.shape[2:]
        # conv_transpose2d returns (Ho-1)s + d(k-1) + 1 rows; the last (padded - that) input rows were
        # never read by the strided conv, and output_padding appends them (as zeros of the adjoint).
        extra = [p - ((o - 1) * s + d * (k - 1) + 1)
                 for p, o, s, d, k in zip(padded, self.out_shape[1:], g.stride, g.dilation, kernel_hw)]
        pad = (t, left) if self._builtin else 0
        x = F.conv_transpose2d(y, self.weight, None, g.stride, pad, tuple(extra), g.groups, g.dilation)
        if not self._builtin:
            x = x[:, :, t:t + self.in_shape[1], left:left + self.in_shape[2]]
        return x.reshape(y.shape[0], -1)

    def _autograd_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``A^T y`` as the gradient of ``<A x, y>`` in ``x``: exact for reflect/replicate/circular padding."""
        with torch.enable_grad():
            x = torch.zeros(y.shape[0], *self.in_shape, dtype=y.dtype, device=y.device, requires_grad=True)
            (grad,) = torch.autograd.grad(self._conv(x, self.weight), x, y)
        return grad.reshape(y.shape[0], -1)


# ---------------------------------------------------------------------------------------------------------
# Top-k singular triplets


@dataclass(frozen=True)
class LanczosConfig:
    """Thick-restart block Lanczos on the Gram operator (Wu & Simon 2000, in block form).

    Each cycle grows a Krylov basis of ``basis`` vectors, ``block`` at a time, from the ``k + guard`` Ritz
    vectors kept from the previous cycle plus the block that continues their Krylov sequence; a restart
    keeps those Ritz vectors instead of starting the Krylov sequence again, so no polynomial degree is lost.
    """
    guard: int = 10  # Ritz vectors kept beyond k: convergence of the k-th value goes with its gap to the (k+guard+1)-th
    block: int = 2  # vectors per Krylov step, at least: an eigenvalue repeated more often than that is found fewer times
    basis: int = 48  # Krylov basis per cycle (memory: basis + block vectors of the smaller side)
    tol: float = 1e-10  # stop when the top-k eigenvalues of G moved <= tol * theta_max in a cycle (see top_eigen_gram)
    max_cycles: int = 300  # restarts before giving up (the result then says converged=False)
    seed: int = 0


@dataclass(frozen=True)
class TopSingular:
    """Top-k singular triplets: ``s [k]`` descending, ``u [k, n_out]``, ``v [k, n_in]`` (unit rows)."""
    s: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    residual: float  # largest ||G x - theta x|| / theta_max over the k Ritz pairs returned
    converged: bool
    gram_products: int  # vectors multiplied by A^T A (or A A^T): the cost, each one conv + one transpose conv


def _orthonormalize(block: torch.Tensor, basis: torch.Tensor | None, gen: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of ``block`` made orthogonal to ``basis`` (twice: classical Gram-Schmidt loses orthogonality
    once, not twice) then orthonormal. Returns (Q, coefficients on basis, R) with block = C·basis + R·Q.
    Rows that vanish (an invariant subspace was found) are replaced by random orthonormal directions with a
    zero row in R, so the Krylov basis keeps its width and the projection stays exact."""
    coef = block.new_zeros(block.shape[0], 0 if basis is None else basis.shape[0])
    if basis is not None:
        for _ in range(2):
            c = block @ basis.T
            block = block - c @ basis
            coef = coef + c
    q, r = torch.linalg.qr(block.T)
    small = r.diagonal().abs() <= 1e-12 * max(float(r.abs().max()), 1e-300)
    if bool(small.any()):
        fresh = torch.randn(int(small.sum()), block.shape[1], generator=gen, dtype=block.dtype).to(block.device)
        keep = q.T[~small]
        fresh, _, _ = _orthonormalize(fresh, keep if basis is None else torch.cat([basis, keep]), gen)
        q = q.clone()
        q.T[small] = fresh
        r = r.clone()
        r[small] = 0
    return q.T.contiguous(), coef, r.T


def _krylov_cycle(gram, kept: torch.Tensor, theta: torch.Tensor, frontier: torch.Tensor, size: int,
                  gen: torch.Generator):
    """Grow ``[kept Ritz vectors | frontier | ...]`` to ``size`` rows, a block at a time.

    Returns the basis ``V`` (rows), the projection ``H = V G V^T`` and the last block's coupling ``R`` to
    the next block ``Q`` (``G V^T = V^T H + Q^T R E^T``: every Ritz residual lies in span(Q)). The kept Ritz
    vectors' rows of H are ``diag(theta)`` plus their coupling to the first block, which the first
    expansion measures instead of assuming.
    """
    b, m = frontier.shape[0], size
    basis = torch.empty(m, frontier.shape[1], dtype=frontier.dtype, device=frontier.device)
    nk = kept.shape[0]
    basis[:nk], basis[nk:nk + b] = kept, frontier
    h = basis.new_zeros(m, m)
    h[:nk, :nk] = torch.diag(theta)
    j = nk
    while True:
        w = gram(basis[j:j + b])  # G V_j = coef V[:j+b] + r Q
        q, coef, r = _orthonormalize(w, basis[:j + b], gen)
        h[:j + b, j:j + b] = coef.T  # upper part of the columns of this block: completed by symmetry below
        if j + 2 * b > m:
            upper = torch.triu(h[:j + b, :j + b])
            return basis[:j + b], upper + torch.triu(upper, 1).T, r, q
        basis[j + b:j + 2 * b] = q
        j += b


def _rayleigh_ritz(basis, h, r_last, keep: int):
    """Top ``keep`` Ritz values/vectors and their residual norms ``||R y_last||`` (Arnoldi relation)."""
    theta, y = torch.linalg.eigh(h)
    theta, y = theta.flip(0)[:keep], y.flip(1)[:, :keep]
    b = r_last.shape[0]
    resid = torch.linalg.vector_norm(r_last.T @ y[-b:], dim=0)
    return theta, y.T @ basis, resid


def block_size(k: int, cfg: LanczosConfig, multiplicity: int) -> int:
    """Vectors per Krylov step. A block of b finds an eigenvalue repeated up to b times, while a narrow block
    grows the polynomial degree fastest per product, and degree is what converges the clustered top values
    of a large convolution (at 56x56, 1 or 2 vectors need ~650-750 products where 14 needed ~4000). So:
    ``cfg.block`` (2, for the near-degenerate pairs of symmetric kernels), widened to the geometry's known
    multiplicity (``ConvOperator.structural_multiplicity``), at most ``k + cfg.guard``.
    """
    return max(1, min(k + cfg.guard, max(cfg.block, multiplicity)))


def top_eigen_gram(gram, n: int, k: int, cfg: LanczosConfig, dtype: torch.dtype, device, block: int = 2
                   ) -> tuple[torch.Tensor, torch.Tensor, float, bool, int]:
    """Top-k eigenpairs of the symmetric PSD operator ``gram`` on ``R^n`` (rows in, rows out).

    Stops when the top-k Ritz values moved by at most ``cfg.tol * theta_max`` over the last cycle, or
    their residuals are that small. Why not residuals alone: the top singular values of a zero-padded
    convolution come in near-degenerate clusters (a plane wave and its shifted twin), whose individual
    residuals shrink with the tiny in-cluster gap while the values themselves are converged long before
    (values err by ~residual^2 / gap to the rest of the spectrum). Ritz values only increase from cycle to
    cycle (each cycle's space contains the previous Ritz vectors), so a stalled value is a converged one.
    """
    keep, b = k + cfg.guard, block
    size = max(cfg.basis, keep + 4 * b)  # room for the kept vectors and at least four blocks
    if n <= size:  # the whole space fits in one basis: the Gram matrix itself, exactly
        theta, x = torch.linalg.eigh(gram(torch.eye(n, dtype=dtype, device=device)))
        return theta.flip(0)[:k], x.flip(1)[:, :k].T.contiguous(), 0.0, True, n
    gen = torch.Generator().manual_seed(cfg.seed)
    frontier, _, _ = _orthonormalize(torch.randn(b, n, generator=gen, dtype=dtype).to(device), None, gen)
    kept, theta = frontier[:0], frontier.new_zeros(0)
    products, resid_rel, previous = 0, math.inf, None
    for _ in range(cfg.max_cycles):
        basis, h, r_last, frontier = _krylov_cycle(gram, kept, theta, frontier, size, gen)
        products += basis.shape[0] - kept.shape[0]
        theta, kept, resid = _rayleigh_ritz(basis, h, r_last, min(keep, basis.shape[0]))
        scale = max(float(theta[0]), 1e-300)
        resid_rel = float(resid[:k].max()) / scale
        moved = math.inf if previous is None else float((theta[:k] - previous).abs().max()) / scale
        if min(resid_rel, moved) <= cfg.tol:
            return theta[:k], kept[:k], resid_rel, True, products
        previous = theta[:k]
    return theta[:k], kept[:k], resid_rel, False, products


def _tap_masks(n_out: int, n_in: int, stride: int, pad: int, dilation: int, k: int) -> dict[tuple, list[int]]:
    """Output positions along one axis grouped by which of the k taps fall inside the input."""
    groups: dict[tuple, list[int]] = {}
    for i in range(n_out):
        mask = tuple(0 <= i * stride - pad + a * dilation < n_in for a in range(k))
        groups.setdefault(mask, []).append(i)
    return groups


def disjoint_top_singular(op: ConvOperator, k: int) -> TopSingular | None:
    """Exact top-k triplets of a zero-padded convolution whose patches never overlap.

    When stride >= the dilated kernel's extent (every 1x1 convolution, say), no input pixel feeds two
    outputs: the operator is block diagonal, one block per output pixel and group, the kernel restricted to
    that pixel's in-bounds taps. Its singular values are those of the few distinct blocks (interior, edges,
    corners), each repeated once per pixel that has it. None when fewer than k nonzero triplets exist this
    way (the rest are zeros; Lanczos handles that case).
    """
    w, g = op.weight, op.geom
    o, cg, kh, kw = w.shape
    og = o // g.groups
    t, _, left, _ = g.padding
    rows = _tap_masks(op.out_shape[1], op.in_shape[1], g.stride[0], t, g.dilation[0], kh)
    cols = _tap_masks(op.out_shape[2], op.in_shape[2], g.stride[1], left, g.dilation[1], kw)
    candidates = []  # (sigma, order, u block, v block, group, row mask, col mask, pixels)
    for rm, ri in rows.items():
        for cm, ci in cols.items():
            if not (any(rm) and any(cm)):
                continue
            for grp in range(g.groups):
                block = w[grp * og:(grp + 1) * og][:, :, list(rm)][:, :, :, list(cm)]
                u, sv, vh = torch.linalg.svd(block.reshape(og, -1), full_matrices=False)
                pixels = [(i, j) for i in ri for j in ci]
                candidates += [(float(sv[n]), len(candidates) + n, u[:, n], vh[n].reshape(cg, sum(rm), sum(cm)),
                                grp, rm, cm, pixels) for n in range(len(sv))]
    candidates.sort(key=lambda c: (-c[0], c[1]))
    s, us, vs = [], [], []
    for sigma, _, ub, vb, grp, rm, cm, pixels in candidates:
        if sigma <= 0:
            break
        for i, j in pixels[:k - len(s)]:
            u = w.new_zeros(op.out_shape)
            u[grp * og:(grp + 1) * og, i, j] = ub
            v = w.new_zeros(op.in_shape)
            r_in = [i * g.stride[0] - t + a * g.dilation[0] for a in range(kh) if rm[a]]
            c_in = [j * g.stride[1] - left + b * g.dilation[1] for b in range(kw) if cm[b]]
            v[grp * cg:(grp + 1) * cg, r_in[0]:r_in[-1] + 1:g.dilation[0], c_in[0]:c_in[-1] + 1:g.dilation[1]] = vb
            s.append(sigma)
            us.append(u.reshape(-1))
            vs.append(v.reshape(-1))
        if len(s) == k:
            return TopSingular(w.new_tensor(s), torch.stack(us), torch.stack(vs), 0.0, True, 0)
    return None


def top_singular(op: ConvOperator, k: int = 10, cfg: LanczosConfig = LanczosConfig()) -> TopSingular:
    """Top-``k`` singular values and vectors of ``op``, by Lanczos on the Gram operator of the smaller side."""
    k = min(k, op.n_in, op.n_out)
    if k < 1:
        raise ValueError(f"top_singular: k must be >= 1 (got {k})")
    if op.geom.padding_mode == "zeros" and op.disjoint_patches:
        exact = disjoint_top_singular(op, k)
        if exact is not None:
            return exact
    dtype, device = op.weight.dtype, op.weight.device
    block = block_size(k, cfg, op.structural_multiplicity)
    with torch.no_grad():
        if op.n_in <= op.n_out:
            theta, v, res, ok, n = top_eigen_gram(lambda x: op.rmatvec(op.matvec(x)), op.n_in, k, cfg, dtype,
                                                  device, block)
            s = theta.clamp_min(0).sqrt()
            u = op.matvec(v) / s.clamp_min(1e-300)[:, None]
        else:
            theta, u, res, ok, n = top_eigen_gram(lambda y: op.matvec(op.rmatvec(y)), op.n_out, k, cfg, dtype,
                                                  device, block)
            s = theta.clamp_min(0).sqrt()
            v = op.rmatvec(u) / s.clamp_min(1e-300)[:, None]
    return TopSingular(s, u, v, res, ok, n)


def conv_top_singular(weight: torch.Tensor, geom: ConvGeometry, k: int = 10, cfg: LanczosConfig = LanczosConfig(),
                      dtype: torch.dtype = torch.float64, device=None) -> TopSingular:
    """Top-``k`` singular triplets of the zero-padded (or ``geom.padding_mode``) convolution."""
    return top_singular(ConvOperator(weight, geom, dtype, device), k, cfg)
