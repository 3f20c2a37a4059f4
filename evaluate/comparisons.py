"""Statistics in the report: seed spread and paired tests built from the per-sample records of each result.

Seeds: a checkpoint label ending in ``seed<N>`` after ``-``, ``_``, ``@`` or ``/`` (``rank-008-seed1``,
``full@seed0``) is seed N of the group named by the rest (``rank-008``, ``full``); ``rankshard-study`` names its
checkpoints that way. Groups with two or more seeds get mean ± 95% CI (Student t) and error bands.

Pairs: two checkpoints evaluated on the same points (same keys, same PGD targets -- targets are drawn per key
from the attack seed) are compared with McNemar's exact test and a paired bootstrap of the difference, read
from the per-sample CSVs the results list as their files. With seed groups, group B is compared with the
baseline group A seed by seed (same seed, same points); without, every checkpoint with the first. The pairs of
one table are one family of tests: their McNemar p-values are Holm-adjusted before any is called significant,
and their bootstrap intervals are simultaneous (Bonferroni) so that they cover as a family too.
"""
from __future__ import annotations

import csv
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


from rankshard.evaluate.results import Skipped, safe_name
from rankshard.evaluate.stats import ALPHA, PairedComparison, cohens_d, compare_paired, holm, mean_ci
from rankshard.evaluate.tables import Table, pct

_SEED = re.compile(r"^(?P<group>.+?)[-_@/]seed(?P<seed>\d+)$")
BOOTSTRAP_RESAMPLES = 2000  # percentile CI endpoints are stable to ~0.1 point at this count for n ~ 1e3-1e4


def seed_group(name: str) -> tuple[str, int | None]:
    """``"rank-008-seed1"`` -> ``("rank-008", 1)``; a label without a seed suffix is its own group."""
    m = _SEED.match(name)
    return (m["group"], int(m["seed"])) if m else (name, None)


def groups_of(names: Sequence[str]) -> dict[str, dict[int | None, str]]:
    """``{group: {seed: checkpoint name}}`` in first-seen order."""
    out: dict[str, dict[int | None, str]] = {}
    for name in names:
        group, seed = seed_group(name)
        out.setdefault(group, {})[seed] = name
    return out


def has_seed_groups(names: Sequence[str]) -> bool:
    return any(len(seeds) > 1 for seeds in groups_of(names).values())


def pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    """Checkpoint pairs (A, B) to test: same seed vs the baseline group's, or every one vs the first."""
    groups = groups_of(names)
    base, *others = list(groups)
    if not others:
        return []
    return [(groups[base][seed], ck) for g in others for seed, ck in groups[g].items() if seed in groups[base]] \
        if any(s is not None for s in groups[base]) else [(names[0], n) for n in names[1:]]


# -- per-sample outcomes -------------------------------------------------------------------------------------

def read_outcomes(path: Path, outcome: Callable[[dict], bool]) -> dict[str, bool]:
    """``{key: outcome(row)}`` from a per-sample CSV."""
    with open(path, newline="") as fh:
        return {row["key"]: outcome(row) for row in csv.DictReader(fh)}


def _compare(oa: dict[str, bool], ob: dict[str, bool], level: float) -> tuple[PairedComparison, int]:
    keys = sorted(oa.keys() & ob.keys())
    return compare_paired([oa[k] for k in keys], [ob[k] for k in keys], BOOTSTRAP_RESAMPLES, level=level), len(keys)


def _paired_row(label: str, a: str, b: str, cmp: PairedComparison, n: int, p_holm: float, what: str) -> dict:
    boot, mc = cmp.bootstrap, cmp.mcnemar
    return {"data": label, "A": a, "B": b, f"{what} A": pct(cmp.rate_a), f"{what} B": pct(cmp.rate_b),
            "B - A (95% CI, points)": f"{100 * boot.diff:+.1f} [{100 * boot.low:+.1f}, {100 * boot.high:+.1f}]",
            "only A / only B": f"{mc.only_a} / {mc.only_b}", "McNemar p": f"{mc.p_value:.3g}",
            "Holm p": f"{p_holm:.3g}", "odds ratio": f"{mc.odds_ratio:.2f}", "n": n, "note": _note(cmp, p_holm)}


def _note(cmp: PairedComparison, p_holm: float) -> str:
    """Both tests agree on noise, both agree on a difference, or they disagree (then say so: borderline).
    McNemar's side is its Holm-adjusted p: a table of m pairs is m tests, and at the raw p one of them would
    read "significant" by chance far more often than ALPHA."""
    if p_holm >= ALPHA and cmp.bootstrap.includes_zero:
        return "within noise"
    if p_holm < ALPHA and not cmp.bootstrap.includes_zero:
        return f"significant (Holm p < {ALPHA})"
    return "borderline: McNemar (Holm) and bootstrap CI disagree"


def paired_table(label: str, outcomes: dict[str, dict[str, bool]], what: str) -> Table | None:
    """The paired-test table for checkpoints ``{name: {key: outcome}}`` evaluated on the same points."""
    pairs_ = pairs(list(outcomes))
    if not pairs_:
        return None
    # The intervals share the tests' family: m pairs get Bonferroni intervals (each at 1 - ALPHA / m), so all m
    # cover their differences together with 95% probability, as Holm's p-values hold the family-wise error;
    # a plain 95% interval per pair would exclude zero by chance as often as an unadjusted p-value.
    level = 1 - ALPHA / len(pairs_)
    tests = [_compare(outcomes[a], outcomes[b], level) for a, b in pairs_]
    adjusted = holm([c.mcnemar.p_value for c, _ in tests])
    rows = [_paired_row(label, a, b, c, n, p, what) for (a, b), (c, n), p in zip(pairs_, tests, adjusted)]
    return Table(rows, f"paired tests on the same points ({what}): McNemar exact on the discordant points, "
                       f"Holm-adjusted over the {len(rows)} pair(s) of this table; paired bootstrap "
                       f"({BOOTSTRAP_RESAMPLES} resamples, seed 0) for B - A, {_interval_kind(len(rows))}; "
                       "odds ratio = only B / only A")


def _interval_kind(pairs_: int) -> str:
    if pairs_ == 1:
        return "95% percentile interval"
    return (f"simultaneous 95% percentile intervals (Bonferroni: each at {100 * (1 - ALPHA / pairs_):.4g}%, "
            f"{pairs_} pairs)")


def noise_notes(table: Table | None) -> list[str]:
    """One sentence per table naming the pairs whose difference is within noise (the report must say so, not
    just show it), with the data they were compared on (a section may hold one table per data variant)."""
    if table is None:
        return []
    quiet = [f"{r['B']} vs {r['A']}" for r in table.rows if r["note"] == "within noise"]
    return [f"Within noise on {table.rows[0]['data']} (Holm p >= {ALPHA} and the bootstrap CI covers 0): "
            f"{', '.join(quiet)}."] if quiet else []


# -- across seeds --------------------------------------------------------------------------------------------

def seed_table(values: dict[str, float], what: str, label: str) -> Table | None:
    """Mean ± 95% CI of ``{checkpoint: value}`` per seed group (only when some group has >= 2 seeds)."""
    if not has_seed_groups(list(values)):
        return None
    rows, groups = [], groups_of(list(values))
    base = [values[n] for n in next(iter(groups.values())).values()]
    for group, seeds in groups.items():
        mine = [values[n] for n in seeds.values()]
        d = cohens_d(base, mine)
        rows.append({"data": label, "group": group, "seeds": ",".join(str(s) for s in seeds),
                     f"{what} mean ± 95% CI (%)": mean_ci(mine).format(),
                     "Cohen's d vs first group": "n/a" if d != d else f"{d:+.2f}",
                     "min - max (%)": f"{100 * min(values[n] for n in seeds.values()):.1f} - "
                                      f"{100 * max(values[n] for n in seeds.values()):.1f}"})
    return Table(rows, f"{what} across seeds: mean ± Student-t 95% confidence interval over seeds")


@dataclass(frozen=True)
class Band:
    """Mean curve of a seed group and its 95% CI per x (NaN bounds with a single seed)."""

    name: str
    x: tuple[int, ...]
    mean: tuple[float, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]
    seeds: int


def bands(series: dict[str, dict[int, float]]) -> list[Band]:
    """``{checkpoint: {k: value}}`` -> one ``Band`` per seed group over the ks every seed has."""
    out = []
    for group, seeds in groups_of(list(series)).items():
        names = list(seeds.values())
        xs = sorted(set.intersection(*(set(series[n]) for n in names)))
        cis = [mean_ci([series[n][k] for n in names]) for k in xs]
        out.append(Band(group, tuple(xs), tuple(c.mean for c in cis), tuple(c.low for c in cis),
                        tuple(c.high for c in cis), len(names)))
    return out


def samples_file(result: dict, name: str, skipped: list[Skipped]) -> Path | None:
    """The per-sample CSV a result lists under ``name`` (relative to its JSON), if it exists. One that is listed
    but gone is noted in ``skipped``: its checkpoint silently missing from the paired tests would read as if
    it had never been compared."""
    for rel in result.get("files", ()):
        if Path(rel).name == name:
            path = Path(result["path"]).parent / rel
            if path.is_file():
                return path
            skipped.append(Skipped(str(path), f"per-sample file listed by {result['path']} is missing: that "
                                              "checkpoint is left out of the paired tests"))
            return None
    return None


def accuracy_samples_name(checkpoint: str, data: str) -> str:
    return f"accuracy-{safe_name(checkpoint)}-{safe_name(data)}-samples.csv"


def pgd_samples_name(checkpoint: str) -> str:
    return f"pgd-{safe_name(checkpoint)}-samples.csv"


def correct(row: dict) -> bool:
    return row["pred"] == row["label"]


def attack_success(targeted: bool) -> Callable[[dict], bool]:
    """SPEC: targeted success = adversarial prediction is the target; untargeted = not the label."""
    return (lambda r: r["adv"] == r["target"]) if targeted else (lambda r: r["adv"] != r["label"])

