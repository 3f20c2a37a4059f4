"""FAB-T, L-inf (Croce & Hein 2020, "Minimally distorted adversarial examples with a fast adaptive boundary
attack"): the targeted FAB of AutoAttack's standard sequence.

Each step linearizes the decision boundary between the true class y and a target t at the current point x1
(hyperplane ``w.x = b`` with ``w`` = grad(z_t - z_y)), projects both x1 and the original x onto it within the
[0, 1] box (``projection_linf``), and moves to a convex combination biased towards x (``alpha`` <= 0.1) with
extrapolation ``eta`` = 1.05; once misclassified, the point is pulled back towards x by ``beta`` = 0.9 and the
smallest perturbation found so far is kept. Targets are the clean prediction's 2nd..(n+1)-th classes, each
run on the samples still robust; a sample counts as fooled only with a perturbation <= eps.

A port of ``fra31/auto-attack``'s ``fab_pt.py`` (as in ``torchattacks.FAB``), operation for operation. With one
restart (AutoAttack standard) FAB uses no random start: it is deterministic and per sample, so batching cannot
change a result. Further restarts would need random starts; they are not offered here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from rankshard.train.attacks import frozen_parameters, parse_eps


@dataclass(frozen=True)
class FABConfig:
    """FAB-T with AutoAttack's standard settings (100 steps, 9 target classes, one restart)."""

    eps: float
    steps: int = 100
    n_target_classes: int = 9
    alpha_max: float = 0.1
    eta: float = 1.05
    beta: float = 0.9
    norm: str = "linf"

    def __post_init__(self) -> None:
        object.__setattr__(self, "eps", parse_eps(self.eps))
        if self.norm != "linf":
            raise ValueError("fab-t: only the L-inf FAB is implemented")
        if not 0 <= self.eps <= 1 or self.steps < 1 or self.n_target_classes < 1:
            raise ValueError(f"FABConfig: need 0 <= eps <= 1, steps >= 1, n_target_classes >= 1; got {self}")


def projection_linf(points: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row: the smallest L-inf step ``d`` with ``w.(points + d) = b`` and ``points + d`` in [0, 1]^n (or the
    step towards it as far as the box allows), by a sort and a bisection over the active coordinates."""
    t, w, b = points, w.clone(), b.clone()
    sign = 2 * ((w * t).sum(1) - b >= 0) - 1
    w.mul_(sign.unsqueeze(1))
    b.mul_(sign)
    a = (w < 0).float()
    d = (a - t) * (w != 0).float()
    p = a - t * (2 * a - 1)
    indp = torch.argsort(p, dim=1)
    b = b - (w * t).sum(1)
    b0 = (w * d).sum(1)
    indp2 = indp.flip((1,))
    ws = w.gather(1, indp2)
    bs2 = -ws * d.gather(1, indp2)
    s = torch.cumsum(ws.abs(), dim=1)
    sb = torch.cumsum(bs2, dim=1) + b0.unsqueeze(1)
    b2 = sb[:, -1] - s[:, -1] * p.gather(1, indp[:, 0:1]).squeeze(1)
    c_l = b - b2 > 0
    c2 = (b - b0 > 0) & (~c_l)
    lb = _bisect(indp[c2], sb[c2], s[c2], p[c2], b[c2], w.shape[1])
    if c_l.any():
        lmbd = torch.clamp_min((b[c_l] - sb[c_l, -1]) / (-s[c_l, -1]), min=0).unsqueeze(-1)
        d[c_l] = (2 * a[c_l] - 1) * lmbd
    lmbd = torch.clamp_min((b[c2] - sb[c2, lb]) / (-s[c2, lb]), min=0).unsqueeze(-1)
    d[c2] = torch.min(lmbd, d[c2]) * a[c2] + torch.max(-lmbd, d[c2]) * (1 - a[c2])
    return d * (w != 0).float()


def _bisect(indp, sb, s, p, b, n: int) -> torch.Tensor:
    """The breakpoint index where the constraint becomes satisfiable (ceil(log2 n) halvings)."""
    lb = torch.zeros(len(b), device=b.device)
    ub = torch.full_like(lb, n - 1)
    for _ in range(math.ceil(math.log2(n))):
        mid = torch.floor((lb + ub) / 2)
        mid_l = mid.long().unsqueeze(1)
        cur = indp.gather(1, indp.size(1) - 1 - mid_l)
        c = b - (sb.gather(1, mid_l) - s.gather(1, mid_l) * p.gather(1, cur)).squeeze(1) > 0
        lb, ub = torch.where(c, mid, lb), torch.where(c, ub, mid)
    return lb.long()


def _boundary(model: nn.Module, x1: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``-(z_y - z_t)`` at x1 and its input gradient (the linearized boundary to the target)."""
    u = torch.arange(len(y), device=y.device)
    im = x1.clone().requires_grad_(True)
    with torch.enable_grad():
        z = model(im)
        diff = -(z[u, y] - z[u, t])
        (grad,) = torch.autograd.grad(diff.sum(), [im])
    return diff.detach(), grad.detach()


def _fab_step(x1, im, w_grad, diff, cfg: FABConfig) -> torch.Tensor:
    """Project x1 and the original onto the boundary hyperplane; move to their biased, extrapolated mix."""
    bs = len(x1)
    w = w_grad.reshape(bs, -1)
    b = -diff + (w_grad * x1).reshape(bs, -1).sum(dim=-1)
    d3 = projection_linf(torch.cat((x1.reshape(bs, -1), im.reshape(bs, -1)), 0), torch.cat((w, w), 0), torch.cat((b, b), 0))
    d1, d2 = d3[:bs].reshape(x1.shape), d3[-bs:].reshape(x1.shape)
    a0 = d3.abs().max(dim=1, keepdim=True)[0].view(-1, 1, 1, 1)
    a0 = torch.max(a0, 1e-8 * torch.ones(a0.shape, device=a0.device))
    a1, a2 = a0[:bs], a0[-bs:]
    alpha = torch.min(torch.max(a1 / (a1 + a2), torch.zeros(a1.shape, device=a1.device)),
                      cfg.alpha_max * torch.ones(a1.shape, device=a1.device))
    return ((x1 + cfg.eta * d1) * (1 - alpha) + (im + d2 * cfg.eta) * alpha).clamp(0.0, 1.0)


def _run_targeted(model: nn.Module, im: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
                  cfg: FABConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One FAB-T run from the clean point: (smallest adversarial point found, its L-inf size; 1e10 if none)."""
    adv, best = im.clone(), 1e10 * torch.ones(len(im), device=im.device)
    x1 = im.clone()
    for _ in range(cfg.steps):
        diff, grad = _boundary(model, x1, y, t)
        with torch.no_grad():
            x1 = _fab_step(x1, im, grad, diff, cfg)
            is_adv = model(x1).argmax(1) != y
            if is_adv.any():
                size = (x1[is_adv] - im[is_adv]).reshape(int(is_adv.sum()), -1).abs().max(dim=1)[0]
                smaller = size < best[is_adv]
                idx = is_adv.nonzero().flatten()
                adv[idx[smaller]] = x1[idx[smaller]]
                best[idx[smaller]] = size[smaller]
                x1[is_adv] = im[is_adv] + (x1[is_adv] - im[is_adv]) * cfg.beta
    return adv, best


def fab_t(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: FABConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """FAB-T on the clean-correct samples of ``x``: ``(adv, robust)`` as ``apgd.apgd`` returns them."""
    x, y = x.detach().contiguous(), y.detach()  # loaders may hand over channels-last views
    with frozen_parameters(model), torch.no_grad():
        logits = model(x)
        adv, robust = x.clone(), logits.argmax(1) == y
        for rank in range(2, min(cfg.n_target_classes, logits.shape[1] - 1) + 2):
            idx = robust.nonzero().flatten()
            if idx.numel() == 0 or cfg.eps == 0:
                break
            found, size = _run_targeted(model, x[idx], y[idx], logits[idx].sort(dim=-1)[1][:, -rank], cfg)
            fooled = (size < 1e10) & (size <= cfg.eps) & (model(found).argmax(1) != y[idx])
            adv[idx[fooled]], robust[idx[fooled]] = found[fooled], False
    return adv, robust
