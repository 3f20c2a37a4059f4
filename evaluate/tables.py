"""Tables for results (the paper's Table 2 layout for PGD) and their Markdown form."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Table:
    """Rows (dicts sharing their keys: the header) and a caption that says what they show."""

    rows: list[dict] = field(default_factory=list)
    caption: str = ""


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


def delta_rank_table(body: dict) -> Table:
    """``pgd --delta-rank``'s perturbation rank structure (a result's ``delta_rank``) per checkpoint: effective and
    stable rank and the energy inside the image's top-k subspaces at k = 1 and 1/8, 1/4, 1/2 of min(H, W), beside
    an isotropic delta."""
    iso = body["isotropic_in_image"]
    ks = sorted({1, *(max(1, len(iso) * f // 8) for f in (1, 2, 4))})
    rows = [{"Checkpoint": name, "n": p["samples"], "effective rank": f"{p['effective_rank']:.1f}",
             "stable rank": f"{p['stable_rank']:.2f}", **{f"in top-{k}": pct(p["in_image"][k - 1]) if p["in_image"]
                                                           else "n/a" for k in ks}}
            for name, p in body["checkpoints"].items()]
    rows.append({"Checkpoint": "isotropic delta", "n": "", "effective rank": "", "stable rank": "",
                 **{f"in top-{k}": pct(iso[k - 1]) for k in ks}})
    return Table(rows, "rank structure of delta = x_adv - x (float64, pooled over channels, mean over samples): "
                       "effective rank (Roy & Vetterli), stable rank, and the share of delta's energy inside the clean "
                       "image's top-k left and right singular subspaces")


def rank_path_table(body: dict, most: int = 12) -> Table:
    """``pgd --spectrum-ranks`` (a result's ``spectrum``) per rank (at most ``most`` of them, evenly spread, ends
    included): per checkpoint top-1 on the clean x_k, recovery and attack success on the adversarial x'_k."""
    ranks = body["ranks"]
    count = min(most, len(ranks))
    shown = sorted({ranks[round(i * (len(ranks) - 1) / max(count - 1, 1))] for i in range(count)})
    rows = []
    for k in shown:
        row: dict = {"rank k": k}
        for name, per_rank in body["checkpoints"].items():
            r = next(r for r in per_rank if r["rank"] == k)
            row |= {f"{name} clean": pct(r["clean_top1"]), f"{name} adv recovery": pct(r["adv_recovery"]),
                    f"{name} adv success": pct(r["adv_success"])}
        rows.append(row)
    return Table(rows, "Algorithm 1 on clean and adversarial inputs: top-1 on the clean x_k, recovery (label) and "
                       "attack success on the adversarial x'_k; the attack was made on the full-rank input, so this is "
                       "not an adaptive evaluation of truncation as a defence")


def accuracy_table_rows(rows: Sequence[dict]) -> list[dict]:
    """Checkpoint x data variant: top-1, top-5, count."""
    return [{"Checkpoint": r["checkpoint"], "Trained on": r["trained_on"], "Data": r["data"],
             "Top-1": pct(r["top1"]), "Top-5": pct(r["top5"]), "n": r["count"]} for r in rows]


SPECTRUM_ALL_RANKS = 25  # up to this many ranks the summary shows every one; beyond, where top-1 changes


def _changed_ranks(results: dict[str, list[dict]], ranks: list[int]) -> list[int]:
    """The endpoints and every rank where some checkpoint's top-1 differs from its value at the previous rank."""
    top1 = {n: {r["rank"]: r["top1"] for r in rows} for n, rows in results.items()}
    keep = [k for prev, k in zip(ranks, ranks[1:]) if any(t.get(k) != t.get(prev) for t in top1.values())]
    return sorted({ranks[0], ranks[-1], *keep})


def spectrum_table(results: dict[str, list[dict]], max_rows: int = SPECTRUM_ALL_RANKS) -> Table:
    """Rank x checkpoint top-1: every requested rank, or with more than ``max_rows`` ranks every rank where
    some checkpoint's top-1 changes plus the first and last (the caption says which)."""
    names = list(results)
    ranks = sorted({r["rank"] for rows in results.values() for r in rows})
    if len(ranks) <= max_rows:
        picked, caption = ranks, f"top-1 at every requested rank ({len(ranks)} ranks)"
    else:
        picked = _changed_ranks(results, ranks)
        caption = (f"top-1 at {len(picked)} of {len(ranks)} requested ranks: the first, the last and every rank "
                   f"where some checkpoint's top-1 changes (all ranks: the per-checkpoint CSV files)")
    lookup = {n: {r["rank"]: r for r in rows} for n, rows in results.items()}
    rows = [{"rank": k, **{n: pct(lookup[n][k]["top1"]) if k in lookup[n] else "" for n in names}} for k in picked]
    return Table(rows, caption)


def eps_label(eps: float, norm: str) -> str:
    """L-inf eps as papers quote it (``8/255``) when it is a whole number of 1/255 steps, else the number."""
    steps = eps * 255
    if norm == "linf" and abs(steps - round(steps)) < 1e-6:
        return "0" if round(steps) == 0 else f"{round(steps)}/255"
    return f"{eps:.4g}"


def robustness_table(rows: Sequence[dict]) -> Table:
    """eps x (checkpoint, attack) robust accuracy from ``robustness`` rows; caption names the threat model."""
    if not rows:
        return Table([], "robust accuracy: no results")
    columns = list(dict.fromkeys((r["checkpoint"], r["attack"]) for r in rows))
    norm = rows[0]["norm"]
    lookup = {(r["checkpoint"], r["attack"], r["eps"]): r for r in rows}
    table = []
    for eps in sorted({r["eps"] for r in rows}):
        row = {"eps": eps_label(eps, norm)}
        for ck, attack in columns:
            hit = lookup.get((ck, attack, eps))
            row[f"{ck} ({attack})"] = pct(hit["robust_accuracy"]) if hit else ""
        table.append(row)
    return Table(table, f"robust accuracy ({norm}) per eps; each attack runs on the points robust to the attacks "
                        f"before it and to every smaller eps, so values never increase down or across ({rows[0]['count']} images)")
