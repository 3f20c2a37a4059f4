"""First-order sensitivity of a layer's top singular values to its weights (seed 002: Fréchet derivatives).

For a simple (non-repeated, nonzero) singular value of a matrix ``M`` with unit singular vectors ``u, v``,
``sigma = <u, M v>`` and ``d sigma / d M = u v^T``: the first-order change under ``M -> M + E`` is
``<u v^T, E>``. Two matrices matter for a convolution:

* the **unfolded** weight ``W.reshape(out, in*kh*kw)``: ``d sigma_i / d W = (u_i v_i^T)`` reshaped back to
  ``[out, in, kh, kw]``;
* the **operator** ``A(W)`` (the convolution at the layer's input resolution, zero padded): ``A`` is linear
  in ``W``, so ``d sigma_max / d W = d <u, A(W) v> / d W`` with ``u, v`` the operator's top singular
  vectors held fixed, computed by autograd through one ``conv2d``.

Per-filter importance is the norm of that gradient over one output filter ``W[o]``: how much a unit-norm
change of filter ``o`` can move the singular value. For the unfolded ``sigma_i`` it equals ``|u_i[o]|``.
A repeated singular value has no derivative (only directional ones); the gradients here are then those of
one value of the cluster and the caller should not read them as unique.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rankshard.evaluate.weights.operator import ConvOperator, TopSingular


def unfolded_sigma_grads(u: torch.Tensor, vh: torch.Tensor, weight_shape: torch.Size | tuple, k: int
                         ) -> torch.Tensor:
    """``[k, *weight_shape]``: ``d sigma_i / d W = u_i v_i^T`` reshaped like the weight, for ``i < k``.

    ``u [out, r]`` and ``vh [r, in*kh*kw]`` are the thin SVD factors of the unfolded weight."""
    k = min(k, u.shape[1])
    return torch.einsum("oi,ic->ioc", u[:, :k], vh[:k]).reshape(k, *weight_shape)


def operator_sigma_grad(op: ConvOperator, top: TopSingular, index: int = 0) -> torch.Tensor:
    """``d sigma_index / d W`` of the operator, ``[out, in/groups, kh, kw]``, in ``op``'s dtype and device."""
    u, v = top.u[index:index + 1], top.v[index:index + 1]
    weight = op.weight.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        value = (u * op.matvec(v, weight=weight)).sum()  # <u, A(W) v> = sigma at the current W
        (grad,) = torch.autograd.grad(value, weight)
    return grad


def filter_importance(grad: torch.Tensor) -> np.ndarray:
    """Norm of a weight-shaped gradient over each output filter: ``[out]``."""
    return torch.linalg.vector_norm(grad.reshape(grad.shape[0], -1), dim=1).double().cpu().numpy()


@dataclass(frozen=True)
class LayerSensitivity:
    """Per-filter importance for the top singular value(s) of one layer (``[out]`` arrays)."""
    unfolded: np.ndarray  # |u_1[o]|: the filter's share in the unfolded sigma_max's gradient
    unfolded_topk: np.ndarray  # sqrt(sum_i u_i[o]^2) over the k kept unfolded values
    operator: np.ndarray | None  # ||d sigma_max(zero-padded operator) / d W[o]||; None without an operator

    def columns(self) -> dict:
        """Summary columns for the weights table: most important filter and its share of the squared norm."""
        out: dict = {}
        for name, imp in (("unfolded", self.unfolded), ("operator_zero", self.operator)):
            if imp is None or imp.size == 0:
                continue
            sq = imp**2
            out[f"sensitivity_{name}_top_filter"] = int(np.argmax(imp))
            out[f"sensitivity_{name}_top_share"] = float(sq.max() / max(sq.sum(), 1e-300))
        if self.operator is not None and self.operator.size:
            a, b = self.unfolded, self.operator
            # cosine of the two importance profiles: 1 when the operator and the unfolded matrix single out
            # the same filters
            out["sensitivity_cosine"] = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300))
        return out


def layer_sensitivity(u: torch.Tensor, vh: torch.Tensor, weight_shape, k: int,
                      op: ConvOperator | None = None, top: TopSingular | None = None) -> LayerSensitivity:
    """Importance of every output filter for the unfolded top values and (given ``op``/``top``) the operator's
    sigma_max."""
    unfolded = filter_importance(unfolded_sigma_grads(u, vh, weight_shape, 1)[0])
    kk = max(1, min(k, u.shape[1]))
    topk = np.sqrt((u[:, :kk].double().cpu().numpy() ** 2).sum(axis=1))
    operator = None if op is None or top is None else filter_importance(operator_sigma_grad(op, top))
    return LayerSensitivity(unfolded, topk, operator)
