"""Report sections, one renderer per result ``kind`` (``RENDERERS``), plus training curves from run folders.

A renderer takes every result of its kind (``evaluate.results`` contract) and a ``Figures`` collector, and
returns sections. Adding a kind = writing it with ``write_result`` and adding a renderer here; ``report`` lists
results whose kind has no renderer as skipped, so nothing disappears silently.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rankshard.evaluate import comparisons as cmp
from rankshard.evaluate.plots import (curve_from_rows, plot_bands, plot_delta_rank, plot_gaps, plot_rank_path,
                                      plot_side_by_side, plot_spectra)
from rankshard.evaluate.results import Skipped, safe_name
from rankshard.evaluate.tables import (Table, accuracy_table_rows, delta_rank_table, pct, pgd_table_rows,
                                       rank_path_table, robustness_table, spectrum_table)


@dataclass
class Section:
    """A titled part of the report: prose, tables and figure files (all under the report's figures folder)."""

    title: str
    text: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)


@dataclass
class Figures:
    """The report's ``figures/`` folder: new plots go there, results' own PNGs are copied in (so the Markdown
    links stay relative), and a figure a result lists but that is gone is recorded as skipped."""

    folder: Path
    skipped: list[Skipped] = field(default_factory=list)

    def new(self, name: str) -> Path:
        return self.folder / f"{len(list(self.folder.iterdir())):03d}-{safe_name(name)}"

    def adopt(self, result: dict) -> list[Path]:
        """Copies of the figures ``result`` lists (paths relative to its JSON), in order."""
        copies = []
        for rel in result.get("figures", ()):
            src = Path(result["path"]).parent / rel
            if not src.is_file():
                self.skipped.append(Skipped(str(src), f"figure listed by {result['path']} is missing"))
                continue
            copies.append(Path(shutil.copyfile(src, self.new(str(rel)))))
        return copies


Renderer = Callable[[list[dict], Figures], list[Section]]


def accuracy_sections(results: list[dict], figs: Figures) -> list[Section]:
    rows = [row for r in results for row in r["rows"]]
    sec = Section("Accuracy", [f"Top-1/top-5 from {len(results)} result file(s)."], [Table(accuracy_table_rows(rows))])
    for data in dict.fromkeys(row["data"] for row in rows):
        top1 = {row["checkpoint"]: row["top1"] for row in rows if row["data"] == data}
        paired = cmp.paired_table(data, _accuracy_outcomes(results, data, figs.skipped), "top-1")
        sec.tables += [t for t in (cmp.seed_table(top1, "top-1", data), paired) if t]
        sec.text += cmp.noise_notes(paired)
    return [sec]


def _accuracy_outcomes(results: list[dict], data: str, skipped: list[Skipped]) -> dict[str, dict[str, bool]]:
    """``{checkpoint: {key: correct}}`` on ``data`` from the per-sample CSVs the results list."""
    out = {}
    for r in results:
        for row in (x for x in r["rows"] if x["data"] == data):
            path = cmp.samples_file(r, cmp.accuracy_samples_name(row["checkpoint"], data), skipped)
            if path is not None:
                out[row["checkpoint"]] = cmp.read_outcomes(path, cmp.correct)
    return out


def spectrum_sections(results: list[dict], figs: Figures) -> list[Section]:
    groups: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for r in results:
        groups.setdefault((r["data"], r["mode"]), {})[r["checkpoint"]] = r["rows"]
    sections = []
    for (data, mode), series in sorted(groups.items()):
        curves = [curve_from_rows(name, rows) for name, rows in series.items()]
        sec = Section(f"Rank spectrum ({mode} rank) on {data}" if mode in ("low", "high") else f"Frequency spectrum ({mode}) on {data}",
                      [f"Algorithm 1: top-1 of each checkpoint on {mode}-k inputs ({len(curves)} checkpoints, "
                       f"{next(iter(series.values()))[0]['count']} images)."])
        sec.figures.append(plot_spectra(curves, mode, f"{mode}-rank spectrum on {data}",
                                        figs.new(f"spectrum-{data}-{mode}.png")))
        if len(curves) > 1:
            sec.figures.append(plot_gaps(curves, mode, f"top-1 gap vs {curves[0].name} on {data}",
                                         figs.new(f"spectrum-{data}-{mode}-gap.png")))
        sec.tables.append(spectrum_table(series))
        if cmp.has_seed_groups(list(series)):
            sec.text.append("Seed groups: mean top-1 over seeds with its 95% confidence band (Student t).")
            sec.figures.append(plot_bands(cmp.bands(_top1_by_k(series)), mode, f"{mode} spectrum on {data}, "
                                          "mean ± 95% CI over seeds", figs.new(f"spectrum-{data}-{mode}-bands.png")))
        sections.append(sec)
    return sections + rank_vs_lowpass_sections(results, figs)


def _top1_by_k(series: dict[str, list[dict]]) -> dict[str, dict[int, float]]:
    return {name: {row["rank"]: row["top1"] for row in rows} for name, rows in series.items()}


def _rank_check_table(results: list[dict]) -> Table | None:
    checks = [r["rank_check"] for r in results if r.get("rank_check")]
    if not checks:
        return None
    rows = [{"k": c["k"], "images": c["images"], "max measured rank (R, G, B)": ", ".join(map(str, c["max_rank"])),
             "mean rank": ", ".join(f"{v:.2f}" for v in c["mean_rank"]), "rank <= k": "yes" if c["bound_holds"] else "NO"}
            for c in checks[0]["rows"]]
    return Table(rows, f"the paper's hypothesis (appendix 9.1): numeric rank of k x k low-pass images per channel, "
                       f"float64 SVD, singular values > {checks[0]['tolerance']} counted")


def rank_vs_lowpass_sections(results: list[dict], figs: Figures) -> list[Section]:
    """Accuracy vs k for rank-k and k x k low-pass inputs side by side, and the rank <= k check on the data."""
    sections = []
    for data in sorted({r["data"] for r in results}):
        by_mode = {m: {r["checkpoint"]: r["rows"] for r in results if r["data"] == data and r["mode"] == m}
                   for m in ("low", "lowpass")}
        if not all(by_mode.values()):
            continue
        sec = Section(f"Rank truncation vs frequency truncation on {data}",
                      ["Top-1 on rank-k inputs (k largest singular values kept) beside top-1 on k x k low-pass inputs "
                       "(k x k lowest 2-D DFT frequencies kept): related but not the same truncation."])
        sec.figures.append(plot_side_by_side({m: cmp.bands(_top1_by_k(s)) for m, s in by_mode.items()},
                                             f"rank-k vs k x k low-pass on {data}", figs.new(f"rank-vs-lowpass-{data}.png")))
        table = _rank_check_table([r for r in results if r["data"] == data and r["mode"] == "lowpass"])
        sec.tables += [table] if table else []
        sections.append(sec)
    return sections


def pgd_section(r: dict, figs: Figures) -> Section:
    a = r["attack"]
    what = (f"{'targeted' if a['targeted'] else 'untargeted'} PGD-{a['steps']}, {a['norm']} eps={a['eps']:.5g}, "
            f"step {a['alpha']:.5g}, {a['restarts']} restart(s), seed {a['seed']} ({r['path']})")
    return Section("PGD robustness", [what], [Table(pgd_table_rows(r["rows"]), "Table 2 layout")])


def _pgd_groups(results: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Results by (data, attack): their checkpoints share points and targets, so they are compared together."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["rows"][0]["data"] if r["rows"] else "?", json.dumps(r["attack"], sort_keys=True)), []).append(r)
    return groups


def pgd_comparison_sections(groups: dict[tuple[str, str], list[dict]], figs: Figures) -> list[Section]:
    """Attack success across seeds and paired between checkpoints, per data and attack (results merged)."""
    sections = []
    for (data, attack), members in groups.items():
        rate = {row["checkpoint"]: row["attack_success"] for r in members for row in r["rows"]}
        success = cmp.attack_success(json.loads(attack)["targeted"])
        outcomes = {row["checkpoint"]: cmp.read_outcomes(p, success) for r in members for row in r["rows"]
                    if (p := cmp.samples_file(r, cmp.pgd_samples_name(row["checkpoint"]), figs.skipped)) is not None}
        paired = cmp.paired_table(data, outcomes, "attack success")
        tables = [t for t in (cmp.seed_table(rate, "attack success", data), paired) if t]
        if tables:
            sections.append(Section(f"PGD comparisons on {data}", ["Attack success rate over all evaluated samples; "
                                    "pairs share their points and targets."] + cmp.noise_notes(paired), tables))
    return sections


def pgd_rank_section(data: str, attack: dict, members: list[dict], figs: Figures) -> Section | None:
    """``pgd --delta-rank`` and ``--spectrum-ranks`` of every checkpoint of one data and attack, one table and one
    figure each, redrawn from the results (a study writes one result per checkpoint)."""
    sec = Section(f"PGD perturbations and rank on {data}")
    deltas = [r["delta_rank"] for r in members if "delta_rank" in r]
    if deltas:
        merged = {"isotropic_in_image": deltas[0]["isotropic_in_image"],
                  "checkpoints": {name: p for d in deltas for name, p in d["checkpoints"].items()}}
        sec.tables.append(delta_rank_table(merged))
        sec.figures.append(plot_delta_rank(merged["checkpoints"], merged["isotropic_in_image"],
                                           f"rank structure of the perturbation on {data}",
                                           figs.new(f"pgd-delta-rank-{data}.png")))
    paths = [r["spectrum"] for r in members if "spectrum" in r]
    same = [p for p in paths if p["ranks"] == paths[0]["ranks"]] if paths else []
    if same:
        merged = {"ranks": same[0]["ranks"], "checkpoints": {name: rows for p in same for name, rows in p["checkpoints"].items()}}
        sec.tables.append(rank_path_table(merged))
        sec.figures.append(plot_rank_path(merged["checkpoints"], attack["targeted"],
                                          f"rank-k truncation of clean and adversarial inputs on {data}",
                                          figs.new(f"pgd-spectrum-{data}.png")))
        if len(same) < len(paths):
            sec.text.append(f"{len(paths) - len(same)} result(s) evaluated other ranks than {same[0]['ranks']}: "
                            "not drawn here (their own pgd-spectrum.png has them).")
    return sec if sec.tables else None


def pgd_sections(results: list[dict], figs: Figures) -> list[Section]:
    groups = _pgd_groups(results)
    sections = [pgd_section(r, figs) for r in results] + pgd_comparison_sections(groups, figs)
    ranked = (pgd_rank_section(data, json.loads(attack), members, figs) for (data, attack), members in groups.items())
    return sections + [s for s in ranked if s]  # drawn after the sections above: figures numbered in reading order


def _rig_lines(ck: dict) -> list[str]:
    lines = [f"{ck['name']}: explained classes {ck['targets']} ({ck['images_per_s']:.2f} images/s)."]
    rp = ck.get("rank_path") or ck.get("check_result", {}).get("rank_path")
    if rp:
        lines.append(f"{ck['name']}: rank-path completeness delta max |{rp['max_abs_delta']:.3g}| "
                     f"(relative {rp['max_relative_delta']:.3g}).")
    return lines


def _randomization_table(ck: dict) -> list[Table]:
    table = ck.get("check_result", {}).get("spearman", {})
    rows = [{"method": m, **{r["stage"]: f"{r['spearman_mean']:.2f}" for r in stages}} for m, stages in table.items()]
    return [Table(rows, f"{ck['name']}: randomization test, mean Spearman correlation with the trained maps "
                        "(high = the map does not depend on the weights)")] if rows else []


def rig_section(r: dict, figs: Figures) -> Section:
    methods = ", ".join(r["config"]["maps"]["methods"])
    sec = Section("Rank Integrated Gradients", [f"{len(r['inputs']['names'])} images "
                  f"({', '.join(r['inputs']['names'])}); methods {methods} ({r['path']})."])
    for ck in r["checkpoints"]:
        sec.text += _rig_lines(ck)
        sec.tables += _randomization_table(ck)
    sec.figures = figs.adopt(r)
    return sec


def weights_section(r: dict, figs: Figures) -> Section:
    size = "x".join(map(str, r["config"]["weights"]["input_size"]))
    return Section("Weight spectra", [f"SVD of every selected Conv2d/Linear weight at input {size} ({r['path']}); "
                                      "full tables in the per-model CSV files."],
                   [Table(rows, f"{model}: {len(rows)} layers") for model, rows in r["tables"].items()],
                   figs.adopt(r))


def svd_profile_section(r: dict, figs: Figures) -> Section:
    pair, src = r.get("most_overlapping"), r["source"]
    text = [f"{src['checkpoint']} on {src['data']}: {len(r['classes'])} classes, "
            f"{sum(r['images_per_class'])} images, mass {r['config']['mass']}."]
    if pair:
        text.append(f"Most overlapping classes: {pair['classes'][0]} / {pair['classes'][1]} "
                    f"(Jaccard {pair['jaccard']:.3f}).")
    return Section("SVD profile", text, [Table(r["summary"], "influential directions per layer")], figs.adopt(r))


def robustness_section(r: dict, figs: Figures) -> Section:
    """The eps sweep: robust-accuracy curves (the result's own figure) and the eps x checkpoint table."""
    a = r["attack"]
    text = [f"{a['norm']} threat model, attacks {', '.join(a['attacks'])} (sequences: "
            + "; ".join(f"{g}: {' -> '.join(seq)}" for g, seq in a["sequences"].items())
            + f"), seed {a['seed']}, on {r['data']} ({r['path']})."]
    text += list(a.get("notes", {}).values())
    return Section("Robust accuracy vs eps", text, [robustness_table(r["rows"])], figs.adopt(r))


def each(build: Callable[[dict, Figures], Section]) -> Renderer:
    """A renderer giving one section per result (kinds whose results are not merged across files)."""
    return lambda results, figs: [build(r, figs) for r in results]


RENDERERS: dict[str, Renderer] = {
    "accuracy": accuracy_sections, "spectrum": spectrum_sections, "pgd": pgd_sections, "rig": each(rig_section),
    "weights": each(weights_section), "svd-profile": each(svd_profile_section),
    "robustness": each(robustness_section),
}


def _epoch_row(record: dict) -> dict:
    row = {"epoch": record["epoch"], "train loss": f"{record['train']['loss']:.4f}",
           "train top-1": pct(record["train"]["top1"])}
    return row | {f"{v} top-1": pct(m["top1"]) for v, m in record.get("eval", {}).items()}


def run_section(run_dir: Path, figs: Figures) -> Section | None:
    """Training curves of a ``rankshard-train`` run folder (config.json, metrics.jsonl, curves.png)."""
    metrics, curves = run_dir / "metrics.jsonl", run_dir / "curves.png"
    if not metrics.is_file():
        figs.skipped.append(Skipped(str(run_dir), "not a training run folder: no metrics.jsonl"))
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    config = json.loads((run_dir / "config.json").read_text()).get("config", {}) \
        if (run_dir / "config.json").is_file() else {}
    sec = Section(f"Training run {run_dir.name}", [f"{run_dir}: {len(records)} epochs; "
                  f"arch {config.get('arch', '?')}, trained on {config.get('train_variant', '?')}."])
    sec.tables.append(Table([_epoch_row(r) for r in records], "per-epoch metrics (metrics.jsonl)"))
    if curves.is_file():
        sec.figures.append(Path(shutil.copyfile(curves, figs.new(f"curves-{run_dir.name}.png"))))
    else:
        figs.skipped.append(Skipped(str(curves), "training curves figure is missing"))
    return sec
