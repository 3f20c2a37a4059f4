"""Robust accuracy as a function of eps (``rankshard-evaluate robustness``): per-sample records and metrics.

For every checkpoint, eps (ascending) and attack group (each ``--attack`` value; ``aa`` = the AutoAttack
sequence of ``rankshard.train.autoattack``), a sample is *robust* when it is classified correctly and no
attack found a misclassified point. Two monotonicity guarantees hold by construction, not by luck:

* **in eps**: a sample fooled at eps' keeps that adversarial point (the eps'-ball lies inside every larger
  ball), and larger eps only attack samples still robust at the smaller one, so robust(eps_j) is a subset of
  robust(eps_{j-1}) and robust accuracy never increases with eps;
* **along the attacks**: group g attacks only samples robust to groups 0..g-1 at the same eps (AutoAttack's
  rule), so with ``--attack pgd,aa`` the ``aa`` row is the robust accuracy under PGD and AutoAttack: <= PGD's.

Random starts and Square's draws come from generators seeded by (seed, sample key, attack, eps), so a
sample's result does not depend on its batch, the batch size or the number of processes.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from rankshard.train.attacks import parse_eps
from rankshard.train.autoattack import AA_STANDARD, ATTACKS, AttackBudget, expand, run_sequence

from rankshard.evaluate.accuracy import predict
from rankshard.evaluate.checkpoints import check_fits
from rankshard.evaluate.plots import plot_robustness
from rankshard.evaluate.results import safe_name, write_csv, write_result
from rankshard.evaluate.errors import EvaluationError
from rankshard.evaluate.robustness import perturbation_size, sample_generators

DEFAULT_EPS = "0,1/255,2/255,4/255,8/255,16/255"
# The options that set each attack's budget (``AttackBudget`` fields), named in budget errors.
BUDGET_OPTIONS = {"pgd": "--pgd-steps", "apgd-ce": "--apgd-steps, --target-classes",
                  "apgd-dlr": "--apgd-steps, --target-classes", "apgd-t": "--apgd-steps, --target-classes",
                  "square": "--square-queries", "fab-t": "--fab-steps, --target-classes"}


@dataclass(frozen=True)
class SweepConfig:
    """The eps values (ascending, [0, 1] pixel units), attack groups, norm, seed and iteration budgets."""

    eps: tuple[float, ...]
    attacks: tuple[str, ...]
    norm: str = "linf"
    seed: int = 0
    budget: AttackBudget = field(default_factory=AttackBudget)

    def __post_init__(self) -> None:
        if not self.eps or list(self.eps) != sorted(set(self.eps)) or self.eps[0] < 0:
            raise EvaluationError(f"--eps: need distinct values >= 0 in ascending order, got {list(self.eps)}")
        if self.norm == "linf" and self.eps[-1] > 1:
            raise EvaluationError(f"--eps: linf eps {self.eps[-1]:g} exceeds the [0, 1] pixel range; write 8/255")
        if not self.attacks:
            raise EvaluationError("--attack: name at least one attack")
        try:
            for group in self.attacks:
                expand([group], self.norm)
        except ValueError as exc:
            raise EvaluationError(f"--attack: {exc}") from None
        self._check_budget()

    def _check_budget(self) -> None:
        """Build every attack once, before any data is read: its config checks the budget (a negative
        --apgd-steps would otherwise surface as a traceback at the first eps > 0, maybe hours in)."""
        for name in dict.fromkeys(n for group in self.attacks for n in self.sequence(group)):
            try:
                ATTACKS[name](self.norm, self.eps[-1], self.budget)
            except ValueError as exc:
                raise EvaluationError(f"--attack {name}: check {BUDGET_OPTIONS[name]} ({exc})") from None

    def sequence(self, group: str) -> list[str]:
        return expand([group], self.norm)

    def describe(self) -> dict:
        """What ran, for the result JSON (including what AutoAttack here leaves out)."""
        notes = {}
        if "aa" in self.attacks:
            ran = self.sequence("aa")
            left = [a for a in AA_STANDARD if a not in ran]
            notes["aa"] = (f"AutoAttack standard sequence: {' -> '.join(ran)}"
                           + (f"; not run ({self.norm} not implemented): {', '.join(left)}" if left else ""))
        return {"eps": list(self.eps), "attacks": list(self.attacks), "norm": self.norm, "seed": self.seed,
                "budget": vars(self.budget), "sequences": {g: self.sequence(g) for g in self.attacks}, "notes": notes}


def parse_eps_list(text: str) -> tuple[float, ...]:
    """``"0,1/255,8/255"`` -> ascending floats (as given: a list out of order is an error, not re-sorted)."""
    try:
        return tuple(parse_eps(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise EvaluationError(f"--eps: {exc}") from None


def _generators(cfg: SweepConfig, keys: Sequence[str], eps: float, names: Sequence[str], device) -> dict:
    return {name: sample_generators(cfg.seed, keys, f"{name}@{eps!r}", device) for name in names}


@dataclass
class _GroupState:
    """One attack group's current per-sample state across eps: still robust, adversarial point, fooled by."""

    robust: torch.Tensor
    adv: torch.Tensor
    by: list[str]


def _step_group(model: nn.Module, x: torch.Tensor, y: torch.Tensor, keys: Sequence[str], cfg: SweepConfig,
                eps: float, group: str, mine: _GroupState, before: _GroupState | None) -> None:
    """Advance ``mine`` to ``eps``: inherit what the previous group found at this eps, then attack the rest."""
    if before is not None:  # fooled at this eps by an earlier group (robust to mine so far): take that point
        take = mine.robust & ~before.robust
        mine.adv[take] = before.adv[take]
        mine.by = [b if t else m for m, b, t in zip(mine.by, before.by, take.tolist())]
        mine.robust = mine.robust & before.robust
    names = cfg.sequence(group)
    res = run_sequence(model, x, y, names, cfg.norm, eps, _generators(cfg, keys, eps, names, x.device),
                       cfg.budget, robust=mine.robust.clone())
    new = mine.robust & ~res.robust
    mine.adv[new] = res.adv[new]
    mine.by = [f"{r}@{eps:.6g}" if n else m for m, r, n in zip(mine.by, res.fooled_by, new.tolist())]
    mine.robust = res.robust


def sweep_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, keys: Sequence[str],
                cfg: SweepConfig) -> dict[str, dict]:
    """``{key: {"label", "clean", "<group>": {"adv": [pred per eps], "delta": [...], "by": [...]}}}``."""
    with torch.no_grad():
        clean = predict(model, x).argmax(1)
    ok = clean == y
    states = [_GroupState(ok.clone(), x.clone(), ["" if c else "clean" for c in ok.tolist()]) for _ in cfg.attacks]
    out = {k: {"label": int(lab), "clean": int(c), **{g: {"adv": [], "delta": [], "by": []} for g in cfg.attacks}}
           for k, lab, c in zip(keys, y.tolist(), clean.tolist())}
    for eps in cfg.eps:
        for g, group in enumerate(cfg.attacks):
            _step_group(model, x, y, keys, cfg, eps, group, states[g], states[g - 1] if g else None)
            with torch.no_grad():
                preds = predict(model, states[g].adv).argmax(1).tolist()
            delta = perturbation_size(states[g].adv, x, cfg.norm).tolist()
            for i, k in enumerate(keys):
                rec = out[k][group]
                rec["adv"].append(preds[i])
                rec["delta"].append(delta[i])
                rec["by"].append(states[g].by[i])
    return out


def sweep_records(model: nn.Module, batches: Iterable, cfg: SweepConfig, device) -> dict[str, dict]:
    """Per-sample sweep records for every sample of ``batches`` (x, y, keys)."""
    records: dict[str, dict] = {}
    for batch in batches:
        x, y = batch.x.to(device, torch.float32), batch.y.to(device)
        records.update(sweep_batch(model, x, y, batch.keys, cfg))
    return records


def _rate(hits: Sequence[bool]) -> float:
    return sum(hits) / len(hits) if hits else float("nan")


def summarize_sweep(records: Mapping[str, dict], cfg: SweepConfig) -> list[dict]:
    """One row per (attack group, eps): robust accuracy, attack success, recovery (fractions in [0, 1])."""
    rows, recs = [], list(records.values())
    clean_ok = [r["clean"] == r["label"] for r in recs]
    for group in cfg.attacks:
        for j, eps in enumerate(cfg.eps):
            recovered = [r[group]["adv"][j] == r["label"] for r in recs]
            robust = [c and a for c, a in zip(clean_ok, recovered)]
            subset = [not a for a, c in zip(recovered, clean_ok) if c]
            rows.append({"attack": group, "norm": cfg.norm, "eps": eps, "count": len(recs),
                         "clean_top1": _rate(clean_ok), "robust_accuracy": _rate(robust),
                         "attack_success": _rate([not a for a in recovered]), "recovery": _rate(recovered),
                         "attack_success_clean_correct": _rate(subset),
                         "max_delta": max((r[group]["delta"][j] for r in recs), default=0.0)})
    return rows


def sample_rows(records: Mapping[str, dict], cfg: SweepConfig) -> list[dict]:
    """Flat per-sample CSV rows: key, label, clean prediction, and per (group, eps) prediction and attacker."""
    out = []
    for key, r in records.items():
        row = {"key": key, "label": r["label"], "clean": r["clean"]}
        for group in cfg.attacks:
            for j, eps in enumerate(cfg.eps):
                row[f"{group}@{eps:.6g}"] = r[group]["adv"][j]
                row[f"{group}@{eps:.6g}_by"] = r[group]["by"][j]
        out.append(row)
    return out



def run_robustness(ckpts: Sequence, data, cfg: SweepConfig, ctx, out: str | Path, allow_size_mismatch: bool = False,
                   quiet: bool = False) -> list[dict] | None:
    """The sweep for every checkpoint: rows on rank 0 (``None`` elsewhere); per-sample CSVs, robustness.csv,
    robustness.png and robustness.json (kind ``robustness``) in ``out``."""
    from rankshard.evaluate.runs import _batches, _ckpt_config, _gathered  # shared run plumbing

    out, rows, files = Path(out), [], []
    for ck in ckpts:
        check_fits(ck, data, allow_size_mismatch)
        batches = _batches(data, ctx, f"robustness {ck.name} ({len(cfg.eps)} eps x {'/'.join(cfg.attacks)})", quiet)
        merged = _gathered(sweep_records(ck.model, batches, cfg, ctx.device), data, ctx,
                           f"robustness of {ck.name} on {data.name}")
        if merged is None:
            continue
        rows += [{"checkpoint": ck.name, "trained_on": ck.trained_on, "data": data.name, **r}
                 for r in summarize_sweep(merged, cfg)]
        files.append(write_csv(out / f"robustness-{safe_name(ck.name)}-samples.csv", sample_rows(merged, cfg)))
    if not ctx.is_main:
        return None
    files.append(write_csv(out / "robustness.csv", rows))
    figure = plot_robustness(rows, cfg.norm, f"robust accuracy vs eps on {data.name}", out / "robustness.png")
    write_result(out, "robustness", {"attack": cfg.describe(), "data": data.name, "rows": rows},
                 config={"checkpoints": _ckpt_config(ckpts), "data": data.name, **cfg.describe()},
                 device=ctx.device, world_size=ctx.world_size, figures=[figure], files=files)
    return rows
