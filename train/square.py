"""Square Attack (Andriushchenko et al. 2020), L-inf: the score-based (gradient-free) attack of AutoAttack.

Random search over vertical-stripe initialisations and square updates of side ``s`` at the corners of the
eps-box: a candidate is kept when it lowers the margin loss ``z_y - max_{i!=y} z_i`` (or already
misclassifies). The square covers a fraction ``p`` of the image, halved on AutoAttack's schedule (iteration
10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 of 10000; ``p_init`` = 0.8).

As the paper's own code (and unlike the batched ``fra31/auto-attack`` port, which shares one square position
and sign per batch), each sample draws its own square and signs, here from its own generator, so a sample's
result does not depend on its batch. Gradient-free, so it also catches gradient masking. No gradient, no
frozen parameters needed: every forward pass runs under ``torch.no_grad``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from rankshard.train.attacks import Generators, select_generators, parse_eps, uniform_noise

_P_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128), (8000, 256))


@dataclass(frozen=True)
class SquareConfig:
    """``n_queries`` forward passes per sample at most (AutoAttack standard: 5000, no schedule rescaling)."""

    eps: float
    n_queries: int = 5000
    p_init: float = 0.8
    norm: str = "linf"
    rescale_schedule: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "eps", parse_eps(self.eps))
        if self.norm != "linf":
            raise ValueError("square: only the L-inf Square Attack is implemented; for L2 use apgd-ce / apgd-t "
                             "(AutoAttack with --norm l2 runs those)")
        if not (0 <= self.eps <= 1) or self.n_queries < 1 or not 0 < self.p_init <= 1:
            raise ValueError(f"SquareConfig: need 0 <= eps <= 1, n_queries >= 1, 0 < p_init <= 1; got {self}")

    def p(self, it: int) -> float:
        """Fraction of pixels the square covers at iteration ``it`` (AutoAttack's piecewise schedule)."""
        if self.rescale_schedule:
            it = int(it / self.n_queries * 10000)
        divisor = 1
        for start, d in _P_SCHEDULE:
            if it > start:
                divisor = d * 2
        return self.p_init / divisor


def margin(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``z_y - max_{i != y} z_i`` per sample: <= 0 means misclassified."""
    logits = model(x)
    u = torch.arange(len(y), device=y.device)
    correct = logits[u, y].clone()
    logits[u, y] = -float("inf")
    return correct - logits.max(dim=1)[0]


def _signs(shape: tuple[int, ...], generator: Generators, device: torch.device) -> torch.Tensor:
    """+-1 per entry (``sign(2u - 1)``, as the reference) from each sample's generator."""
    return torch.sign(2 * uniform_noise(torch.empty(shape, device=device), generator) - 1)


def _proposal(x: torch.Tensor, best: torch.Tensor, s: int, eps: float, generator: Generators) -> torch.Tensor:
    """``best`` with one s x s square per sample (own position, own sign per channel) moved to +-eps."""
    n, c, h, w = x.shape
    draws = uniform_noise(torch.empty(n, 2 + c, device=x.device), generator)
    vh, vw = ((h - s) * draws[:, 0]).long(), ((w - s) * draws[:, 1]).long()  # as the reference: [0, h - s)
    signs = torch.sign(2 * draws[:, 2:] - 1)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = ((rows >= vh.view(-1, 1, 1)) & (rows < (vh + s).view(-1, 1, 1))
              & (cols >= vw.view(-1, 1, 1)) & (cols < (vw + s).view(-1, 1, 1)))
    delta = inside.unsqueeze(1) * (2.0 * eps * signs).view(n, c, 1, 1)
    return torch.clamp(torch.min(torch.max(best + delta, x - eps), x + eps), 0.0, 1.0)


@torch.no_grad()
def square(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: SquareConfig,
           generator: Generators = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Square Attack on the clean-correct samples of ``x``: ``(adv, robust)`` as ``apgd.apgd`` returns them."""
    x, (_, c, h, w) = x.detach(), x.shape
    adv, robust = x.clone(), margin(model, x, y) > 0
    idx = robust.nonzero().flatten()
    if idx.numel() == 0 or cfg.eps == 0:
        return adv, robust
    xs, ys, gens = x[idx], y[idx], select_generators(generator, idx)
    best = torch.clamp(xs + cfg.eps * _signs((len(idx), c, 1, w), gens, x.device), 0.0, 1.0)  # vertical stripes
    loss = margin(model, best, ys)
    for it in range(cfg.n_queries):  # as the reference: n_queries proposals after the stripes
        active = (loss > 0).nonzero().flatten()
        if active.numel() == 0:
            break
        s = max(int(round(math.sqrt(cfg.p(it) * h * w))), 1)
        cand = _proposal(xs[active], best[active], s, cfg.eps, select_generators(gens, active))
        new = margin(model, cand, ys[active])
        keep = new < loss[active]  # margin loss: improving also covers newly misclassified (margin <= 0)
        best[active[keep]], loss[active[keep]] = cand[keep], new[keep]
    fooled = loss <= 0
    adv[idx[fooled]], robust[idx[fooled]] = best[fooled], False
    return adv, robust
