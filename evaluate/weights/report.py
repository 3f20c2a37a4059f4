"""Tables and figures of a weights analysis; ``run_weights_analysis`` writes everything for N models.

Output layout under ``out_dir``::

    weights.json                      the result (kind "weights", ``evaluate.results``): config, per-model
                                      summary tables, figures and files
    depth.png                         alpha and stable rank across depth, all models, permuted dotted
    compare.csv / compare.json        (two or more models) chosen statistics side by side, joined by layer
    <model>/weights.csv|json          one row per layer (see rankshard.evaluate.weights.spectra.layer_row)
    <model>/vectors.npz               top-k unfolded singular triplets: "<layer>/u", "/s", "/vh"
    <model>/esd.png                   ESD histograms of the first layers with the fitted MP density
    <model>/filters.png               first-layer top right singular vectors as RGB filters (3-channel input)
    <model>/lipschitz.png, sensitivity.png|npz   zero-padded operator and sensitivities (operator_report.py)

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas directly, so importing this module
never changes the process-wide pyplot backend.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from rankshard.preprocess.progress import Progress

from rankshard.evaluate.results import safe_name, write_result
from rankshard.evaluate.weights.operator_report import write_operator_report
from rankshard.evaluate.weights.rmt import esd, mp_density
from rankshard.evaluate.weights.spectra import (LayerResult, WeightsConfig, analyse_model, as_pair, layer_row,
                                                select_layers)


@dataclass(frozen=True)
class ReportConfig:
    """What the figures show."""
    esd_layers: int = 16  # ESD panels drawn per model (first layers in depth order)
    esd_spectrum: str = "unfolded"  # "unfolded" or "operator"
    dpi: int = 110
    compare_stats: tuple[str, ...] = ("alpha", "stable_rank", "effective_rank", "spectral_norm", "mp_spikes")


def _clean(value):
    """JSON has no NaN/inf: write null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_table(rows: list[dict], stem: Path) -> None:
    """``stem.csv`` (union of columns, blanks where a layer lacks one) and ``stem.json``."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    with open(stem.with_suffix(".json"), "w") as f:
        json.dump([{k: _clean(v) for k, v in row.items()} for row in rows], f, indent=1)


def save_vectors(results: list[LayerResult], path: Path) -> None:
    """Top-k unfolded singular triplets of every layer, keyed ``"<layer>/u|s|vh"``."""
    arrays = {}
    for r in results:
        for part in ("u", "s", "vh"):
            arrays[f"{r.info.name}/{part}"] = getattr(r.top, part).numpy()
    np.savez_compressed(path, **arrays)


def _save(fig: Figure, path: Path, dpi: int) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi)


def _esd_panel(ax, result: LayerResult, spectrum: str) -> None:
    """Histogram of the trained ESD, the permuted one as an outline, the fitted MP density and its edge."""
    sp, st = result.spectra[spectrum], result.stats[spectrum]
    lam = esd(sp.svals, sp.rows)
    bins = np.linspace(0.0, lam.max() * 1.02, 50)
    ax.hist(lam, bins=bins, density=True, color="C0", alpha=0.6, label="trained")
    perm = result.spectra.get(spectrum + "_perm")
    if perm is not None:
        ax.hist(np.clip(esd(perm.svals, perm.rows), 0, bins[-1]), bins=bins, density=True,
                histtype="step", color="k", label="permuted")
    grid = np.linspace(st["mp_lambda_minus"], st["mp_lambda_plus"], 300)[1:-1]
    ax.plot(grid, mp_density(grid, st["mp_ratio"], st["mp_variance"]), color="C3", label="MP fit")
    ax.axvline(st["mp_threshold"], color="C3", ls="--", lw=0.8, label="spike threshold (Tracy-Widom)")
    ax.set_title(f"{result.info.name}  spikes={st['mp_spikes']}  a={st['alpha']:.2f}", fontsize=7)
    ax.tick_params(labelsize=6)


def plot_esd_grid(results: list[LayerResult], path: Path, cfg: ReportConfig = ReportConfig()) -> None:
    """Grid of per-layer ESD histograms (first ``cfg.esd_layers`` layers) with the MP density overlaid."""
    shown = [r for r in results if cfg.esd_spectrum in r.spectra][: cfg.esd_layers]
    if not shown:
        return
    cols = min(4, len(shown))
    rows = -(-len(shown) // cols)
    fig = Figure(figsize=(3.2 * cols, 2.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, r in zip(axes, shown):
        _esd_panel(ax, r, cfg.esd_spectrum)
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=6)
    fig.suptitle(f"ESD ({cfg.esd_spectrum}), lambda = sigma^2 / out", fontsize=9)
    fig.supxlabel("eigenvalue lambda = sigma^2 / out", fontsize=8)
    fig.supylabel("density", fontsize=8)
    _save(fig, path, cfg.dpi)


def plot_depth(tables: dict[str, list[dict]], path: Path, cfg: ReportConfig = ReportConfig()) -> None:
    """Alpha and stable rank against depth for every model; the permuted baseline dotted in the same colour."""
    fig = Figure(figsize=(11, 6), layout="constrained")
    axes = fig.subplots(2, 2, squeeze=False)
    for col, spectrum in enumerate(("unfolded", "operator")):
        for row, stat in enumerate(("alpha", "stable_rank")):
            ax = axes[row][col]
            for i, (model, rows) in enumerate(tables.items()):
                for suffix, style in (("", "-"), ("_perm", ":")):
                    key = f"{spectrum}{suffix}_{stat}"
                    pts = [(r["index"], r[key]) for r in rows if key in r]
                    if pts:
                        x, y = zip(*pts)
                        ax.plot(x, y, style, color=f"C{i}", marker=".", ms=3,
                                label=model + (" (permuted)" if suffix else ""))
            ax.set_title(f"{stat} ({spectrum})", fontsize=9)
            ax.set_xlabel("layer (forward order)", fontsize=8)
            if stat == "stable_rank":
                ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    _save(fig, path, cfg.dpi)


def plot_filters(result: LayerResult, path: Path, cfg: ReportConfig = ReportConfig()) -> bool:
    """Top right singular vectors of a 3-channel conv as RGB filters (``in x kh x kw``); False if not RGB."""
    w = result.info.weight
    if result.info.kind != "conv" or w.shape[1] != 3 or result.top.vh.shape[0] == 0:
        return False
    vecs = result.top.vh.reshape(-1, *w.shape[1:]).numpy()  # [k, 3, kh, kw]
    fig = Figure(figsize=(1.4 * len(vecs), 1.7), layout="constrained")
    axes = fig.subplots(1, len(vecs), squeeze=False)[0]
    for ax, v, s in zip(axes, vecs, result.top.s.tolist()):
        # Singular vectors have an arbitrary sign and unit norm: centre on grey, scale by the largest tap.
        img = 0.5 + v.transpose(1, 2, 0) / (2.0 * max(np.abs(v).max(), 1e-12))
        ax.imshow(img, interpolation="nearest")
        ax.set_title(f"s={s:.2f}", fontsize=7)
        ax.set_axis_off()
    fig.suptitle(f"{result.info.name}: top right singular vectors", fontsize=8)
    _save(fig, path, cfg.dpi)
    return True


def compare_rows(tables: dict[str, list[dict]], cfg: ReportConfig = ReportConfig()) -> list[dict]:
    """Chosen statistics of every model side by side, joined by layer name (first model's order)."""
    names = list(dict.fromkeys(r["name"] for rows in tables.values() for r in rows))
    by_model = {m: {r["name"]: r for r in rows} for m, rows in tables.items()}
    out = []
    for name in names:
        row = {"name": name}
        for model, rows in by_model.items():
            r = rows.get(name, {})
            for spectrum in ("unfolded", "operator", "unfolded_perm", "operator_perm"):
                for stat in cfg.compare_stats:
                    row[f"{model}:{spectrum}_{stat}"] = r.get(f"{spectrum}_{stat}", "")
        out.append(row)
    return out


def write_model_report(name: str, results: list[LayerResult], out_dir: Path,
                       cfg: ReportConfig = ReportConfig()) -> list[dict]:
    """Table, vectors and figures of one model under ``out_dir/<name>``; returns the table rows."""
    folder = out_dir / safe_name(name)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [layer_row(r) for r in results]
    write_table(rows, folder / "weights")
    save_vectors(results, folder / "vectors.npz")
    plot_esd_grid(results, folder / "esd.png", cfg)
    first_conv = next((r for r in results if r.info.kind == "conv"), None)
    if first_conv is not None:
        plot_filters(first_conv, folder / "filters.png", cfg)
    write_operator_report(results, rows, folder, cfg.dpi)
    return rows


# per layer, in the result's summary tables (all columns: the CSVs); optional ones appear when computed
SUMMARY_STATS = ("unfolded_spectral_norm", "unfolded_stable_rank", "unfolded_alpha", "unfolded_alpha_reliable",
                 "unfolded_mp_spikes", "operator_spectral_norm", "operator_zero_sigma_max", "ww_alpha",
                 "ww_alpha_reliable")


def summary_rows(rows: list[dict]) -> list[dict]:
    """The per-layer columns the report shows (the full table has ~60 columns)."""
    return [{"layer": r["name"], "kind": r["kind"], "shape": r["shape"],
             **{k: _clean(r[k]) for k in SUMMARY_STATS if k in r}} for r in rows]


def _outputs(out: Path, names: list[str]) -> tuple[list[Path], list[Path]]:
    """(figures, other files) that exist after the analysis, for the result's ``figures``/``files``."""
    figures = [out / "depth.png"] + [out / safe_name(n) / f for n in names
                                     for f in ("esd.png", "filters.png", "lipschitz.png", "sensitivity.png")]
    files = [out / safe_name(n) / f for n in names
             for f in ("weights.csv", "weights.json", "vectors.npz", "sensitivity.npz")]
    files += [out / "compare.csv", out / "compare.json"]
    return [f for f in figures if f.exists()], [f for f in files if f.exists()]


def run_weights_analysis(models: dict[str, nn.Module], input_size: int | tuple[int, int], out_dir: str | Path,
                         layers_pattern: str = "*", config: WeightsConfig | None = None,
                         report: ReportConfig = ReportConfig(), workers: int | None = None,
                         quiet: bool = True) -> dict[str, list[LayerResult]]:
    """Analyse every model and write tables, vectors, figures (and the comparison for 2+ models) and the
    ``weights.json`` result.

    ``config`` supplies everything else; ``input_size`` and ``layers_pattern`` override its fields. Every
    model is analysed before anything is written, so a bad ``--layers`` leaves no half-written folder.
    """
    cfg = replace(config or WeightsConfig(), input_size=as_pair(input_size), layers=layers_pattern)
    total = sum(len(select_layers(m, layers_pattern)) for m in models.values())  # raises on a bad pattern
    bar = Progress(total, "weights", unit="layer", enabled=not quiet)
    results = {name: analyse_model(model, cfg, workers, on_layer=lambda _r: bar.update(1))
               for name, model in models.items()}
    bar.close()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = {name: write_model_report(name, res, out, report) for name, res in results.items()}
    plot_depth(tables, out / "depth.png", report)
    if len(models) > 1:
        write_table(compare_rows(tables, report), out / "compare")
    figures, files = _outputs(out, list(models))
    write_result(out, "weights", {"models": {n: len(r) for n, r in results.items()},
                                  "tables": {n: summary_rows(t) for n, t in tables.items()}},
                 config={"weights": _jsonable(asdict(cfg)), "report": asdict(report)}, device="cpu",
                 figures=figures, files=files)
    return results


def _jsonable(obj):
    """Config values as JSON: tuples to lists, non-finite floats to null (the result must be strict JSON)."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return _clean(obj)
