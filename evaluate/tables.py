"""Markdown tables for results (the paper's Table 2 layout for PGD)."""
from __future__ import annotations

from collections.abc import Sequence


def pct(value: float) -> str:
    """0.9521 -> ``95.21%`` (``n/a`` for NaN: e.g. no clean-correct samples)."""
    return "n/a" if value != value else f"{100 * value:.2f}%"


def markdown_table(rows: Sequence[dict]) -> str:
    """A GitHub-flavoured Markdown table from dicts sharing their keys (the header)."""
    if not rows:
        return "_no results_"
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(r[h]) for h in head) + " |" for r in rows]
    return "\n".join(lines)


def pgd_table_rows(rows: Sequence[dict]) -> list[dict]:
    """Table 2 columns: trained on, attack success, recovery, clean top-1; plus robust accuracy, the
    clean-correct subset and the sample count."""
    return [{"Checkpoint": r["checkpoint"], "Trained on": r["trained_on"],
             "Attack success rate": pct(r["attack_success"]), "Recovery rate": pct(r["recovery"]),
             "Top-1 accuracy": pct(r["clean_top1"]), "Robust accuracy": pct(r["robust_accuracy"]),
             "Success (clean-correct)": pct(r["attack_success_clean_correct"]),
             "Recovery (clean-correct)": pct(r["recovery_clean_correct"]), "n": r["count"]} for r in rows]


def accuracy_table_rows(rows: Sequence[dict]) -> list[dict]:
    """Checkpoint x data variant: top-1, top-5, count."""
    return [{"Checkpoint": r["checkpoint"], "Trained on": r["trained_on"], "Data": r["data"],
             "Top-1": pct(r["top1"]), "Top-5": pct(r["top5"]), "n": r["count"]} for r in rows]


def spectrum_table_rows(results: dict[str, list[dict]], every: int = 1) -> list[dict]:
    """Rank x checkpoint top-1 (every ``every``-th rank, plus the last), for a compact summary."""
    names = list(results)
    ranks = [r["rank"] for r in results[names[0]]]
    picked = [k for i, k in enumerate(ranks) if i % every == 0 or i == len(ranks) - 1]
    lookup = {n: {r["rank"]: r for r in rows} for n, rows in results.items()}
    return [{"rank": k, **{n: pct(lookup[n][k]["top1"]) if k in lookup[n] else "" for n in names}} for k in picked]
