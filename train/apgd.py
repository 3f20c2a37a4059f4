"""Auto-PGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks"): APGD-CE, APGD-DLR and the targeted APGD-T of AutoAttack.

A port of the reference algorithm (``fra31/auto-attack`` ``autopgd_base.py``, as copied by ``torchattacks``
``APGD``/``APGDT``), operation for operation, so that with the same random start it returns the same points
(``tests/test_train_autoattack.py`` checks this against ``torchattacks`` where it is installed):

* step size starts at 2 eps per sample and is halved at checkpoints (after 22% of the steps, then ever closer,
  at least 6% apart) when the loss went up in fewer than ``rho`` = 75% of the steps since the last checkpoint,
  or when the best loss did not improve and the step size was not halved last time; a halved sample restarts
  from its best point;
* momentum: ``x_{k+1} = P(x_k + 0.75 (z_{k+1} - x_k) + 0.25 (x_k - x_{k-1}))``, ``z = P(x_k + eta * step)``;
* losses: cross-entropy, the DLR margin ``-(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3)`` (scale invariant) and the
  targeted DLR ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``, targets being the clean prediction's 2nd..
  (n+1)-th most likely classes.

Deliberate difference: the random start draws from one generator per sample (``attacks.Generators``), and each
run attacks only the samples still robust, so a sample's result never depends on its batch. The norm-specific
parts are a tiny interface chosen from ``APGD_STEPS``, as ``attacks.STEPS`` is for PGD.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rankshard.train.attacks import Generators, select_generators, frozen_parameters, parse_eps, uniform_noise


def normal_noise(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """N(0, 1) noise shaped like ``x`` from one generator or one per sample (see ``uniform_noise``)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype) for g in generator])


def _sample_norm(t: torch.Tensor) -> torch.Tensor:
    return (t ** 2).sum(dim=(1, 2, 3), keepdim=True).sqrt()


class LinfAPGDStep:
    """L-inf: start at a random corner-biased point of the box, sign step, clip to the box and [0, 1]."""

    def __init__(self, orig: torch.Tensor, eps: float):
        self.orig, self.eps = orig, eps

    def start(self, generator: Generators) -> torch.Tensor:
        t = 2 * uniform_noise(self.orig, generator) - 1
        return self.orig + self.eps * t / t.reshape(len(t), -1).abs().max(dim=1, keepdim=True)[0].reshape(-1, 1, 1, 1)

    def ascent(self, x: torch.Tensor, grad: torch.Tensor, step_size: torch.Tensor) -> torch.Tensor:
        return self.project(x + step_size * torch.sign(grad))

    def project(self, z: torch.Tensor, slack: float = 0.0) -> torch.Tensor:
        return torch.clamp(torch.min(torch.max(z, self.orig - self.eps), self.orig + self.eps), 0.0, 1.0)


class L2APGDStep:
    """L2: start on the eps sphere in a Gaussian direction, normalized-gradient step, radial projection."""

    def __init__(self, orig: torch.Tensor, eps: float):
        self.orig, self.eps = orig, eps

    def start(self, generator: Generators) -> torch.Tensor:
        t = normal_noise(self.orig, generator)
        return self.orig + self.eps * t / (_sample_norm(t) + 1e-12)

    def ascent(self, x: torch.Tensor, grad: torch.Tensor, step_size: torch.Tensor) -> torch.Tensor:
        return self.project(x + step_size * grad / (_sample_norm(grad) + 1e-12))

    def project(self, z: torch.Tensor, slack: float = 0.0) -> torch.Tensor:
        # ``slack``: the reference adds 1e-12 to the norm inside min() on the momentum projection only; kept
        # so the iterates match it bit for bit.
        d = z - self.orig
        n = _sample_norm(d)
        return torch.clamp(self.orig + d / (n + 1e-12) * torch.min(self.eps * torch.ones_like(z), n + slack), 0.0, 1.0)


APGD_STEPS = {"linf": LinfAPGDStep, "l2": L2APGDStep}
LOSSES = ("ce", "dlr", "dlr-targeted")


@dataclass(frozen=True)
class APGDConfig:
    """One APGD attack (AutoAttack standard: 100 steps, 1 restart; APGD-T: 9 target classes)."""

    norm: str
    eps: float
    steps: int = 100
    loss: str = "ce"
    restarts: int = 1
    n_target_classes: int = 9
    rho: float = 0.75

    def __post_init__(self) -> None:
        object.__setattr__(self, "eps", parse_eps(self.eps))
        if self.norm not in APGD_STEPS:
            raise ValueError(f"APGDConfig: unknown norm {self.norm!r}; choose one of {sorted(APGD_STEPS)}")
        if self.loss not in LOSSES:
            raise ValueError(f"APGDConfig: unknown loss {self.loss!r}; choose one of {list(LOSSES)}")
        if not math.isfinite(self.eps) or self.eps < 0 or (self.norm == "linf" and self.eps > 1):
            raise ValueError(f"APGDConfig: eps must be finite, >= 0 (and <= 1 for linf), got {self.eps}")
        if self.steps < 1 or self.restarts < 1 or self.n_target_classes < 1:
            raise ValueError("APGDConfig: steps, restarts and n_target_classes must be >= 1")

    @property
    def targeted(self) -> bool:
        return self.loss == "dlr-targeted"

    @property
    def schedule(self) -> tuple[int, int, int]:
        """(first checkpoint, minimum distance, decrement) in steps: 22%, 6%, 3% of the budget."""
        return max(int(0.22 * self.steps), 1), max(int(0.06 * self.steps), 1), max(int(0.03 * self.steps), 1)


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of logits ratio: the margin to the best other class over (top-1 - top-3); needs >= 3 classes."""
    z_sorted, ind_sorted = logits.sort(dim=1)
    top_is_y = (ind_sorted[:, -1] == y).float()
    u = torch.arange(len(y), device=y.device)
    return -(logits[u, y] - z_sorted[:, -2] * top_is_y - z_sorted[:, -1] * (1.0 - top_is_y)) / (
        z_sorted[:, -1] - z_sorted[:, -3] + 1e-12)


def dlr_targeted_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR: ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``; needs >= 4 classes."""
    z_sorted = logits.sort(dim=1)[0]
    u = torch.arange(len(y), device=y.device)
    return -(logits[u, y] - logits[u, target]) / (z_sorted[:, -1] - 0.5 * z_sorted[:, -3] - 0.5 * z_sorted[:, -4] + 1e-12)


def _loss_and_grad(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, cfg: APGDConfig,
                   target: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-sample loss, logits, input gradient of the summed loss) at ``x_adv``."""
    x_adv = x_adv.detach().requires_grad_(True)
    logits = model(x_adv)
    if cfg.loss == "ce":
        loss = F.cross_entropy(logits, y, reduction="none")
    elif cfg.loss == "dlr":
        loss = dlr_loss(logits, y)
    else:
        loss = dlr_targeted_loss(logits, y, target)
    (grad,) = torch.autograd.grad(loss.sum(), [x_adv])
    return loss.detach(), logits.detach(), grad.detach()


@dataclass
class _State:
    """Per-sample state of one APGD run (all tensors indexed by sample)."""

    x_adv: torch.Tensor
    grad: torch.Tensor
    x_best: torch.Tensor
    grad_best: torch.Tensor
    loss_best: torch.Tensor
    x_best_adv: torch.Tensor
    robust: torch.Tensor
    step_size: torch.Tensor


def _oscillating(loss_steps: torch.Tensor, i: int, k: int, rho: float) -> torch.Tensor:
    """Condition 1 of the paper: the loss increased in at most ``rho * k`` of the last ``k`` steps. Index
    ``i - j - 1`` wraps to the (still zero) last row at the first checkpoint, exactly as the reference does."""
    t = torch.zeros(loss_steps.shape[1], dtype=torch.float64)
    for j in range(k):
        t += (loss_steps[i - j] > loss_steps[i - j - 1]).double()
    return t <= k * rho


def _run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: APGDConfig, target: torch.Tensor | None,
         generator: Generators) -> tuple[torch.Tensor, torch.Tensor]:
    """One APGD run: (x_best_adv, still-robust mask); x_best_adv is a misclassified iterate where one exists."""
    geom = APGD_STEPS[cfg.norm](x, cfg.eps)
    x_adv = geom.start(generator).clamp(0.0, 1.0)
    loss, logits, grad = _loss_and_grad(model, x_adv, y, cfg, target)
    s = _State(x_adv, grad, x_adv.clone(), grad.clone(), loss.clone(), x_adv.clone(), logits.argmax(1) == y,
               2.0 * cfg.eps * torch.ones([len(x), 1, 1, 1], device=x.device, dtype=x.dtype))
    k, k_min, k_decr = cfg.schedule
    loss_steps = torch.zeros([cfg.steps, len(x)])
    last_best, reduced_last = s.loss_best.clone(), torch.ones(len(x), dtype=torch.bool)
    x_old, since_check = s.x_adv.clone(), 0
    for i in range(cfg.steps):
        with torch.no_grad():
            momentum, x_old = s.x_adv - x_old, s.x_adv.clone()
            a = 0.75 if i > 0 else 1.0
            z = geom.ascent(s.x_adv, s.grad, s.step_size)
            s.x_adv = geom.project(s.x_adv + (z - s.x_adv) * a + momentum * (1 - a), slack=1e-12)
        loss, logits, s.grad = _loss_and_grad(model, s.x_adv, y, cfg, target)
        _record(s, loss, logits.argmax(1) == y)
        loss_steps[i] = loss.cpu()
        since_check += 1
        if since_check == k:
            halve = _oscillating(loss_steps, i, k, cfg.rho) | (~reduced_last & (last_best.cpu() >= s.loss_best.cpu()))
            reduced_last, last_best = halve.clone(), s.loss_best.clone()
            _halve(s, halve.to(x.device))
            since_check, k = 0, max(k - k_decr, k_min)
    return s.x_best_adv, s.robust


def _record(s: _State, loss: torch.Tensor, correct: torch.Tensor) -> None:
    """Keep the latest misclassified iterate and the best-loss point (strictly higher loss) per sample."""
    s.robust = s.robust & correct
    s.x_best_adv[~correct] = s.x_adv[~correct]
    better = loss > s.loss_best
    s.x_best[better], s.grad_best[better], s.loss_best[better] = s.x_adv[better], s.grad[better], loss[better]


def _halve(s: _State, halve: torch.Tensor) -> None:
    """Halve the step of the flagged samples and restart them from their best point and its gradient."""
    if halve.any():
        s.step_size[halve] /= 2.0
        s.x_adv[halve] = s.x_best[halve]
        s.grad[halve] = s.grad_best[halve]


def apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: APGDConfig,
         generator: Generators = None) -> tuple[torch.Tensor, torch.Tensor]:
    """APGD on ``x`` (in [0, 1]): ``(adv, robust)``, where ``adv`` is a misclassified point in the eps-ball for
    each sample the attack fooled (``robust`` False) and ``x`` itself otherwise. Samples misclassified on
    the clean input count as not robust and are not attacked. Each restart / target class attacks only the
    samples still robust; random starts draw from ``generator`` (one per sample for batch independence)."""
    x, y = x.detach(), y.detach()
    with frozen_parameters(model), torch.enable_grad():
        with torch.no_grad():
            clean_logits = model(x)
        adv, robust = x.clone(), clean_logits.argmax(1) == y
        ranks = range(2, cfg.n_target_classes + 2) if cfg.targeted else [None]
        if cfg.targeted and clean_logits.shape[1] < max(4, cfg.n_target_classes + 1):
            raise ValueError(f"apgd-t: {clean_logits.shape[1]} classes cannot give {cfg.n_target_classes} target "
                             "classes and the targeted DLR loss (needs >= 4 classes); lower n_target_classes")
        for rank in ranks:
            for _ in range(cfg.restarts):
                idx = robust.nonzero().flatten()
                if idx.numel() == 0:
                    return adv, robust
                target = clean_logits[idx].sort(dim=1)[1][:, -rank] if rank else None
                found, still = _run(model, x[idx], y[idx], cfg, target, select_generators(generator, idx))
                fooled = idx[~still]
                adv[fooled], robust[fooled] = found[~still], False
    return adv, robust
