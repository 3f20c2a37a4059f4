"""Projected gradient descent (Madry et al. 2018), shared by adversarial training and evaluation.

Semantics follow the MadryLab ``robustness`` library (``attacker.py``, ``attack_steps.py``), as SPEC.md
asks: random start in the eps-ball, step size ``2.5 * eps / steps`` unless given, each iterate projected
onto the ball and then clamped to [0, 1], and the best iterate (highest attack objective) kept per sample.
Targeted attacks minimize CE(target), written here as maximizing ``-CE(target)`` so one "higher is better"
rule serves both. The norm-specific parts are a tiny interface (``random_perturb``, ``step``, ``project``)
chosen from ``STEPS``.

Deliberate differences from ``robustness``: the input gradient is that of the *sum* of per-sample losses
(theirs: the mean), so a sample's step never depends on the batch size (identical for the L-inf sign step;
for L2 it only moves the 1e-10 guard in the normalization); restarts keep the per-sample best objective
(theirs: the last restart that fooled the model). With ``restarts=1`` (the default) neither matters.

Models take pixel-space inputs in [0, 1] (normalization is inside the model, see ``rankshard.train.models``).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def parse_eps(value: str | float | int) -> float:
    """``"4/255"`` -> 0.01568..., ``"0.5"`` -> 0.5, numbers pass through (as used by the CLIs)."""
    if isinstance(value, (int, float)):
        return float(value)
    text = value.replace(" ", "")
    try:
        if "/" in text:
            num, den = text.split("/")
            return float(Fraction(num) / Fraction(den))
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"cannot parse eps {value!r}: write a number or a fraction such as '4/255'") from None


@dataclass(frozen=True)
class PGDConfig:
    """One PGD attack. ``eps`` and ``step_size`` are in [0, 1] pixel units (L-inf: per pixel; L2: the norm of
    the whole C*H*W perturbation). ``step_size=None`` -> ``2.5 * eps / steps`` (Madry et al.)."""

    norm: str
    eps: float
    steps: int
    step_size: float | None = None
    targeted: bool = False
    random_start: bool = True
    restarts: int = 1
    use_best: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "eps", parse_eps(self.eps))  # frozen: parse "4/255" once, here
        if self.norm not in STEPS:
            raise ValueError(f"PGDConfig: unknown norm {self.norm!r}; choose one of {sorted(STEPS)}")
        if not math.isfinite(self.eps) or self.eps < 0:
            raise ValueError(f"PGDConfig: eps must be a finite number >= 0, got {self.eps}")
        if self.norm == "linf" and self.eps > 1:
            raise ValueError(f"PGDConfig: linf eps={self.eps:g} exceeds the whole [0, 1] pixel range; eps is in "
                             f"[0, 1] units: did you mean {self.eps:g}/255 = {self.eps / 255:.5f}?")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"PGDConfig: steps must be an integer >= 0, got {self.steps!r}")
        if not isinstance(self.restarts, int) or self.restarts < 1:
            raise ValueError(f"PGDConfig: restarts must be an integer >= 1, got {self.restarts!r}")
        if self.step_size is not None and not (math.isfinite(self.step_size) and self.step_size >= 0):
            raise ValueError(f"PGDConfig: step_size must be None or a finite number >= 0, got {self.step_size}")

    @property
    def alpha(self) -> float:
        """The step size actually used."""
        if self.step_size is not None:
            return float(self.step_size)
        return 2.5 * self.eps / self.steps if self.steps else 0.0


# One generator for the whole batch, or one per sample: per-sample generators make a sample's random start
# independent of the batch it lands in (batch size, DDP rank), so distributed evaluation is reproducible.
Generators = torch.Generator | Sequence[torch.Generator] | None


def uniform_noise(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """U[0, 1) noise shaped like ``x``, drawn from one generator or from ``generator[i]`` for sample ``i``."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if len(generator) != len(x):
        raise ValueError(f"pgd: got {len(generator)} per-sample generators for a batch of {len(x)}")
    return torch.stack([torch.rand(x.shape[1:], generator=g, device=x.device, dtype=x.dtype) for g in generator])


def select_generators(generator: Generators, idx: torch.Tensor) -> Generators:
    """The generators of the samples ``idx`` (attacks that rerun on the still-robust subset); a single shared
    generator (or None) passes through."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    return [generator[i] for i in idx.tolist()]


class LinfStep:
    """L-inf ball: uniform random start in the box, sign-gradient step, clamp to the eps box."""

    def __init__(self, orig: torch.Tensor, eps: float, step_size: float):
        self.orig, self.eps, self.step_size = orig, eps, step_size

    def random_perturb(self, x: torch.Tensor, generator: Generators) -> torch.Tensor:
        noise = uniform_noise(x, generator)
        return torch.clamp(x + 2 * (noise - 0.5) * self.eps, 0, 1)

    def step(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return x + self.step_size * torch.sign(grad)  # steepest ascent for the L-inf geometry

    def project(self, x: torch.Tensor) -> torch.Tensor:
        diff = torch.clamp(x - self.orig, -self.eps, self.eps)
        return torch.clamp(self.orig + diff, 0, 1)


class L2Step:
    """L2 ball: random start on (at most) the eps sphere, unit-norm gradient step, per-sample projection."""

    def __init__(self, orig: torch.Tensor, eps: float, step_size: float):
        self.orig, self.eps, self.step_size = orig, eps, step_size

    def random_perturb(self, x: torch.Tensor, generator: Generators) -> torch.Tensor:
        # As robustness: centred uniform noise rescaled to norm <= eps (in high dimension: ~= eps).
        noise = uniform_noise(x, generator) - 0.5
        return torch.clamp(x + noise.renorm(p=2, dim=0, maxnorm=self.eps), 0, 1)

    def step(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        norm = grad.flatten(1).norm(dim=1).view(-1, *[1] * (grad.dim() - 1))
        return x + self.step_size * grad / (norm + 1e-10)  # 1e-10: a zero gradient gives no step, not NaN

    def project(self, x: torch.Tensor) -> torch.Tensor:
        # renorm along dim 0 rescales each sample whose L2 norm exceeds eps; the [0, 1] clamp afterwards
        # only shrinks coordinates towards orig (which lies in [0, 1]), so it stays inside the ball.
        diff = (x - self.orig).renorm(p=2, dim=0, maxnorm=self.eps)
        return torch.clamp(self.orig + diff, 0, 1)


STEPS: dict[str, type[LinfStep] | type[L2Step]] = {"linf": LinfStep, "l2": L2Step}

# The paper's evaluation setting (Jere, Kumar, Koushanfar, Table 2).
PAPER_PGD = PGDConfig(norm="linf", eps=4 / 255, steps=20, targeted=True)


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Turn ``requires_grad`` off for every parameter (no weight gradients are built or accumulated, which
    also saves the backward work for them) and restore each parameter's own flag afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _objective(model: nn.Module, x: torch.Tensor, goal: torch.Tensor, sign: float) -> torch.Tensor:
    """Per-sample attack objective to maximize: CE(label) untargeted (sign=+1), -CE(target) targeted."""
    return sign * F.cross_entropy(model(x), goal, reduction="none")


def _keep_best(best_x: torch.Tensor | None, best_loss: torch.Tensor | None, x: torch.Tensor,
               loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, keep the input with the strictly higher objective (ties keep the earlier one)."""
    if best_x is None:
        return x.detach().clone(), loss.detach().clone()
    better = loss > best_loss
    best_x[better] = x.detach()[better]
    best_loss[better] = loss.detach()[better]
    return best_x, best_loss


def _run(model: nn.Module, x: torch.Tensor, goal: torch.Tensor, sign: float, cfg: PGDConfig,
         generator: Generators) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One PGD run from one random start: (adversarial x, its objective or None if not needed)."""
    step = STEPS[cfg.norm](x, cfg.eps, cfg.alpha)
    adv = step.random_perturb(x, generator) if cfg.random_start else x.clone()
    best_x = best_loss = None
    for _ in range(cfg.steps):
        adv = adv.detach().requires_grad_(True)
        loss = _objective(model, adv, goal, sign)
        (grad,) = torch.autograd.grad(loss.sum(), [adv])
        with torch.no_grad():
            if cfg.use_best:
                best_x, best_loss = _keep_best(best_x, best_loss, adv, loss)
            adv = step.project(step.step(adv, grad))
    if not cfg.use_best and cfg.restarts == 1:
        return adv.detach(), None  # last iterate, and nothing to compare it with: skip a forward pass
    with torch.no_grad():
        final = _objective(model, adv, goal, sign)
    if not cfg.use_best:
        return adv.detach(), final
    return _keep_best(best_x, best_loss, adv, final)


def _check_inputs(x: torch.Tensor, y: torch.Tensor, cfg: PGDConfig, target: torch.Tensor | None) -> None:
    if x.dim() < 2 or y.shape != x.shape[:1]:
        raise ValueError(f"pgd: expected images [N, ...] and labels [N], got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.numel() and (float(x.min()) < 0 or float(x.max()) > 1):
        raise ValueError(f"pgd: images must be in [0, 1] pixel space (the model normalizes inside), got values "
                         f"in [{float(x.min()):.3g}, {float(x.max()):.3g}]; pass unnormalized images")
    if cfg.targeted and (target is None or target.shape != y.shape):
        raise ValueError("pgd: a targeted attack needs target [N] (e.g. rankshard.train.attacks.random_targets(y, C, gen))")
    if not cfg.targeted and target is not None:
        raise ValueError("pgd: target given but cfg.targeted is False; set targeted=True or drop target")


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: PGDConfig, target: torch.Tensor | None = None,
        generator: Generators = None) -> torch.Tensor:
    """Adversarial examples for ``x`` (in [0, 1]) within ``cfg``'s eps-ball, detached, same shape/dtype.

    Untargeted: maximizes CE(model(x'), y). Targeted: minimizes CE(model(x'), target). Parameters are frozen
    during the attack (``requires_grad`` restored afterwards; no ``.grad`` touched). Train/eval mode is the
    caller's choice and is left as is: use ``model.eval()`` for evaluation, and also during adversarial
    training as ``robustness`` does, or BatchNorm statistics absorb the attack iterates. Random starts draw
    from ``generator`` (on ``x``'s device), so a seeded generator gives reproducible examples; a sequence of
    generators (one per sample) makes each sample's examples independent of the rest of the batch.
    """
    _check_inputs(x, y, cfg, target)
    goal, sign = (target, -1.0) if cfg.targeted else (y, 1.0)
    x = x.detach()
    best_x = best_loss = None
    # enable_grad: callers often evaluate under torch.no_grad(); the attack needs input gradients regardless.
    with frozen_parameters(model), torch.enable_grad():
        for _ in range(cfg.restarts):
            adv, loss = _run(model, x, goal, sign, cfg, generator)
            if loss is None:
                return adv
            best_x, best_loss = _keep_best(best_x, best_loss, adv, loss)
    return best_x


def random_targets(labels: torch.Tensor, num_classes: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A target per label, uniform over the ``num_classes - 1`` other classes (label + U{1..C-1} mod C)."""
    if num_classes < 2:
        raise ValueError(f"random_targets: need at least 2 classes, got num_classes={num_classes}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"random_targets: labels must lie in [0, {num_classes}), got "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    offsets = torch.randint(1, num_classes, labels.shape, generator=generator, device=labels.device)
    return (labels + offsets) % num_classes
