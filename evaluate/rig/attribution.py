"""Gradient attributions for image classifiers: the shared batched-gradient core and the baselines.

Everything here works in pixel space on inputs in [0, 1] (the project's models normalize inside), for one
image at a time and one target class. The expensive part of every method is the same: gradients of one
scalar output (softmax probability or logit of the target class) at many points. ``batched_gradients``
computes them ``batch_size`` points per forward/backward pass: in eval mode each point is an independent
input, so the gradient of the *sum* of the per-point outputs with respect to the stacked points holds each
point's own gradient.

Baselines: vanilla gradient (Simonyan et al. 2013), Integrated Gradients with a black baseline (Sundararajan
et al. 2017; Riemann or Gauss-Legendre quadrature) and SmoothGrad (Smilkov et al. 2017, seeded noise).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# The scalar being explained, per point: logits [B, K] and target class -> [B].
OUTPUTS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "prob": lambda logits, cls: F.softmax(logits, dim=-1)[:, cls],
    "logit": lambda logits, cls: logits[:, cls],
}


def _signed_max(g: torch.Tensor) -> torch.Tensor:
    """Per pixel, the channel value of largest magnitude with its sign (|result| = max-abs)."""
    idx = g.abs().argmax(dim=-3, keepdim=True)
    return g.gather(-3, idx).squeeze(-3)


# Channel reductions [..., C, H, W] -> [..., H, W]. "max-abs" is SPEC/Simonyan's; "max" is the paper's
# literal "maximum gradient across all colour channels"; "sum" keeps completeness (attributions add up).
REDUCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "max-abs": lambda g: g.abs().amax(dim=-3),
    "signed-max": _signed_max,
    "max": lambda g: g.amax(dim=-3),
    "sum": lambda g: g.sum(dim=-3),
}
SIGNED_REDUCTIONS = frozenset({"signed-max", "max", "sum"})  # maps that can be negative (diverging colours)


def _choice(table: dict, name: str, what: str):
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; choose one of {sorted(table)}")
    return table[name]


def reduce_channels(g: torch.Tensor, reduction: str = "max-abs") -> torch.Tensor:
    """Reduce a per-channel map ``[..., C, H, W]`` to ``[..., H, W]`` with one of ``REDUCTIONS``."""
    return _choice(REDUCTIONS, reduction, "channel reduction")(g)


def model_output(model: nn.Module, x: torch.Tensor, target: int, output: str = "prob") -> torch.Tensor:
    """The explained scalar (``OUTPUTS[output]`` of class ``target``) for each image of ``x [B, C, H, W]``."""
    return _choice(OUTPUTS, output, "output")(model(x), target)


def predicted_class(model: nn.Module, x: torch.Tensor) -> int:
    """The model's top class for one image ``x [C, H, W]``."""
    with torch.no_grad():
        return int(model(x[None]).argmax(dim=-1)[0])


def _param_flags(model: nn.Module) -> list[tuple[torch.nn.Parameter, bool]]:
    return [(p, p.requires_grad) for p in model.parameters()]


def batched_gradients(model: nn.Module, points: Iterator[torch.Tensor] | torch.Tensor, target: int,
                      output: str = "prob", batch_size: int = 64) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(grads [B, C, H, W], values [B])`` of the explained scalar for successive batches of points.

    ``points`` is a tensor ``[P, C, H, W]`` (split into ``batch_size`` chunks here) or an iterator of
    ready-made batches. Weight gradients are switched off for the duration (their backward work is saved);
    the model must be in eval mode, so that batch norm does not mix the points of a batch.
    """
    if model.training:
        raise ValueError("attributions need model.eval(): in train mode batch norm mixes the points of a batch")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = points.split(batch_size) if isinstance(points, torch.Tensor) else points
    flags = _param_flags(model)
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        for xb in batches:
            xb = xb.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                values = model_output(model, xb, target, output)
                (grads,) = torch.autograd.grad(values.sum(), xb)
            yield grads, values.detach()
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def vanilla_gradient(model: nn.Module, x: torch.Tensor, target: int, output: str = "prob") -> torch.Tensor:
    """The gradient of the explained scalar at ``x [C, H, W]``: ``[C, H, W]``."""
    (grads, _), = batched_gradients(model, x[None], target, output, 1)
    return grads[0]


# -- quadrature on [0, 1] ------------------------------------------------------------------------------


def _riemann(where: float) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
    def nodes(m: int) -> tuple[np.ndarray, np.ndarray]:
        return (np.arange(m) + where) / m, np.full(m, 1.0 / m)
    return nodes


def _trapezoid(m: int) -> tuple[np.ndarray, np.ndarray]:
    t = np.linspace(0.0, 1.0, m + 1)
    w = np.full(m + 1, 1.0 / m)
    w[[0, -1]] /= 2
    return t, w


def _gauss_legendre(m: int) -> tuple[np.ndarray, np.ndarray]:
    t, w = np.polynomial.legendre.leggauss(m)  # on [-1, 1]: map to [0, 1]
    return (t + 1) / 2, w / 2


# rule -> (steps -> (nodes t in [0, 1], weights summing to 1)). Trapezoid with m steps evaluates m + 1 nodes;
# Gauss-Legendre with m nodes integrates polynomials of degree 2m - 1 exactly.
RULES: dict[str, Callable[[int], tuple[np.ndarray, np.ndarray]]] = {
    "left": _riemann(0.0),
    "right": _riemann(1.0),
    "midpoint": _riemann(0.5),
    "trapezoid": _trapezoid,
    "gauss-legendre": _gauss_legendre,
}


def quadrature(rule: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of ``rule`` with ``steps`` steps on [0, 1] (weights sum to 1)."""
    if steps < 1:
        raise ValueError(f"quadrature steps must be >= 1, got {steps}")
    return _choice(RULES, rule, "quadrature rule")(steps)


def path_integral(model: nn.Module, starts: torch.Tensor, ends: torch.Tensor, target: int, output: str = "prob",
                  rule: str = "left", steps: int = 1, batch_size: int = 64) -> torch.Tensor:
    """``sum_s (e_s - a_s) * int_0^1 grad f(a_s + t (e_s - a_s)) dt`` over straight segments ``a_s -> e_s``.

    ``starts``/``ends`` are ``[S, C, H, W]``; the integral of each segment is approximated with
    ``quadrature(rule, steps)``. Returns the per-channel attribution ``[C, H, W]``. Points are built batch by
    batch, so memory is ``batch_size`` images whatever ``S * steps`` is.
    """
    t, w = (torch.as_tensor(a, dtype=starts.dtype, device=starts.device) for a in quadrature(rule, steps))
    deltas = ends - starts
    m, total = len(t), len(starts) * len(t)
    shape = (-1,) + (1,) * (starts.ndim - 1)

    def indices() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for lo in range(0, total, batch_size):
            idx = torch.arange(lo, min(lo + batch_size, total), device=starts.device)
            yield idx // m, idx % m  # segment and node of every point of the batch

    chunks = list(indices())
    points = (starts[seg] + t[node].view(shape) * deltas[seg] for seg, node in chunks)
    attr = torch.zeros_like(starts[0])
    # the generator first: zip then runs it to its end, which restores the parameters' requires_grad flags
    for (grads, _), (seg, node) in zip(batched_gradients(model, points, target, output, batch_size), chunks):
        attr += (grads * w[node].view(shape) * deltas[seg]).sum(dim=0)
    return attr


@dataclass(frozen=True)
class IGConfig:
    """Integrated Gradients: ``steps`` quadrature steps of ``rule`` from the black image to the input."""

    steps: int = 32
    rule: str = "gauss-legendre"

    def __post_init__(self) -> None:
        quadrature(self.rule, self.steps)  # validates both


def integrated_gradients(model: nn.Module, x: torch.Tensor, target: int, cfg: IGConfig = IGConfig(),
                         output: str = "prob", batch_size: int = 64) -> torch.Tensor:
    """IG with a black baseline: ``x * int_0^1 grad f(a x) da``, per channel ``[C, H, W]``.

    Completeness: the attributions sum to ``f(x) - f(0)`` up to the quadrature error.
    """
    return path_integral(model, torch.zeros_like(x)[None], x[None], target, output, cfg.rule, cfg.steps, batch_size)


@dataclass(frozen=True)
class SmoothGradConfig:
    """SmoothGrad: mean gradient over ``samples`` noisy copies, noise std = ``sigma`` x (max - min) of x."""

    samples: int = 25
    sigma: float = 0.15   # fraction of the image's value range; Smilkov et al. recommend 0.10-0.20
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples < 1 or self.sigma < 0:
            raise ValueError(f"SmoothGrad needs samples >= 1 and sigma >= 0, got {self.samples}, {self.sigma}")


def smoothgrad(model: nn.Module, x: torch.Tensor, target: int, cfg: SmoothGradConfig = SmoothGradConfig(),
               output: str = "prob", batch_size: int = 64) -> torch.Tensor:
    """Mean gradient at ``x + N(0, (sigma (max - min))^2)``, per channel ``[C, H, W]``; seeded (CPU generator)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    scale = cfg.sigma * float(x.max() - x.min())
    noise = torch.randn((cfg.samples, *x.shape), generator=gen, dtype=x.dtype).to(x.device)
    total = torch.zeros_like(x)
    for grads, _ in batched_gradients(model, x[None] + scale * noise, target, output, batch_size):
        total += grads.sum(dim=0)
    return total / cfg.samples
