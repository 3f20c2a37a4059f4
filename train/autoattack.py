"""Attacks by name, and attack sequences run as AutoAttack runs them (Croce & Hein 2020).

Every attack here has one signature, ``attack(model, x, y, generator) -> (adv, robust)``: ``robust[i]`` is
True when sample ``i`` is classified correctly on the clean input and the attack found no misclassified point
in its eps-ball; ``adv[i]`` is that misclassified point where one was found, else ``x[i]``.

``run_sequence`` applies several attacks one after the other, each only to the samples still robust, and
records which attack fooled each sample first. A sample's robustness after an attack is therefore "robust to
this attack and every earlier one", so robust accuracy never increases along a sequence: listing ``pgd``
before ``aa`` guarantees that the reported AutoAttack robust accuracy is <= PGD's on the same points.

``AA_STANDARD`` is AutoAttack's "standard" version: APGD-CE (100 steps), APGD-T (9 target classes, 100 steps),
FAB-T (9 target classes, 100 steps) and Square (5000 queries), one restart each. For L2 only the APGD
members are implemented here (FAB-T and Square are L-inf only), so ``aa`` with ``norm="l2"`` runs APGD-CE and
APGD-T, and every result says which members ran.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rankshard.train.apgd import APGDConfig, apgd
from rankshard.train.attacks import Generators, PGDConfig, pgd, select_generators
from rankshard.train.fab import FABConfig, fab_t
from rankshard.train.square import SquareConfig, square

Attack = Callable[[nn.Module, torch.Tensor, torch.Tensor, Generators], tuple[torch.Tensor, torch.Tensor]]

AA_STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
LINF_ONLY = ("fab-t", "square")


@dataclass(frozen=True)
class AttackBudget:
    """Iteration budgets (AutoAttack standard by default; tests and smoke runs shrink them)."""

    pgd_steps: int = 20
    apgd_steps: int = 100
    n_target_classes: int = 9
    square_queries: int = 5000
    fab_steps: int = 100


def _pgd(norm: str, eps: float, budget: AttackBudget) -> Attack:
    """Untargeted PGD (MadryLab semantics: random start, step 2.5 eps / steps, best iterate)."""
    cfg = PGDConfig(norm, eps, budget.pgd_steps)

    def attack(model, x, y, generator):
        with torch.no_grad():
            clean = model(x).argmax(1) == y
        adv = pgd(model, x, y, cfg, generator=generator)
        with torch.no_grad():
            robust = clean & (model(adv).argmax(1) == y)
        return torch.where(robust.view(-1, 1, 1, 1) | ~clean.view(-1, 1, 1, 1), x, adv), robust
    return attack


def _apgd(loss: str) -> Callable[[str, float, AttackBudget], Attack]:
    def make(norm: str, eps: float, budget: AttackBudget) -> Attack:
        cfg = APGDConfig(norm, eps, budget.apgd_steps, loss, n_target_classes=budget.n_target_classes)
        return lambda model, x, y, generator: apgd(model, x, y, _fit_targets(cfg, model, x), generator)
    return make


def _fit_targets(cfg: APGDConfig, model: nn.Module, x: torch.Tensor) -> APGDConfig:
    """APGD-T with fewer classes than 9 + 1: as AutoAttack, use every other class as a target."""
    if not cfg.targeted or x.numel() == 0:
        return cfg
    with torch.no_grad():
        classes = model(x[:1]).shape[1]
    n = min(cfg.n_target_classes, classes - 1)
    return cfg if n == cfg.n_target_classes else APGDConfig(cfg.norm, cfg.eps, cfg.steps, cfg.loss, cfg.restarts, n, cfg.rho)


def _square(norm: str, eps: float, budget: AttackBudget) -> Attack:
    cfg = SquareConfig(eps, budget.square_queries, norm=norm)
    return lambda model, x, y, generator: square(model, x, y, cfg, generator)


def _fab_t(norm: str, eps: float, budget: AttackBudget) -> Attack:
    cfg = FABConfig(eps, budget.fab_steps, budget.n_target_classes, norm=norm)
    return lambda model, x, y, generator: fab_t(model, x, y, cfg)  # deterministic: no generator needed


ATTACKS: dict[str, Callable[[str, float, AttackBudget], Attack]] = {
    "pgd": _pgd, "apgd-ce": _apgd("ce"), "apgd-dlr": _apgd("dlr"), "apgd-t": _apgd("dlr-targeted"),
    "fab-t": _fab_t, "square": _square,
}
SEQUENCES: dict[str, tuple[str, ...]] = {"aa": AA_STANDARD}


def expand(names: Sequence[str], norm: str) -> list[str]:
    """Attack names with sequences (``aa``) expanded; unknown names and norm limits are clear errors."""
    out = []
    for name in names:
        parts = SEQUENCES.get(name, (name,))
        for part in parts:
            if part not in ATTACKS:
                raise ValueError(f"unknown attack {part!r}; choose from {sorted(ATTACKS) + sorted(SEQUENCES)}")
            if part in LINF_ONLY and norm != "linf":
                if name == "aa":
                    continue  # AutoAttack L2 here: APGD-CE + APGD-T (the results say what did not run)
                raise ValueError(f"{part}: only L-inf is implemented; use apgd-ce/apgd-t (or aa) for --norm l2")
            out.append(part)
    return out


@dataclass
class SequenceResult:
    """Per sample: the adversarial point (x where none was found), whether it is still robust, and the name
    of the attack that fooled it first ("" if none; "clean" if misclassified without attack)."""

    adv: torch.Tensor
    robust: torch.Tensor
    fooled_by: list[str]


def run_sequence(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: Sequence[str], norm: str, eps: float,
                 generators: Mapping[str, Generators] | None = None, budget: AttackBudget = AttackBudget(),
                 robust: torch.Tensor | None = None) -> SequenceResult:
    """Run ``names`` in order, each on the samples still robust (``robust`` in: samples already known to be
    non-robust, e.g. fooled at a smaller eps, are skipped and stay non-robust)."""
    x, y = x.detach(), y.detach()
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    robust = clean if robust is None else robust & clean
    fooled_by = ["" if r else ("clean" if not c else "before") for r, c in zip(robust.tolist(), clean.tolist())]
    adv = x.clone()
    for name in names:
        idx = robust.nonzero().flatten()
        if idx.numel() == 0 or eps == 0:
            break
        gens = select_generators((generators or {}).get(name), idx)
        found, still = ATTACKS[name](norm, eps, budget)(model, x[idx], y[idx], gens)
        for i in idx[~still].tolist():
            fooled_by[i] = name
        adv[idx[~still]], robust[idx[~still]] = found[~still], False
    return SequenceResult(adv, robust, fooled_by)
