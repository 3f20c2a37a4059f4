"""One evaluation run per subcommand: compute on every rank, gather by key, write tables and figures on rank 0.

The CLI parses options and calls these; tests and notebooks call them directly with ``tensor_data``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from rankshard.preprocess.rank.engine import RankEngine
from rankshard.preprocess.progress import Progress
from rankshard.preprocess.rank.lowpass import rank_check

from rankshard.evaluate.accuracy import accuracy_records, summarize_accuracy
from rankshard.evaluate.checkpoints import LoadedCheckpoint, check_fits
from rankshard.evaluate.data import EvalData
from rankshard.evaluate.distributed import DistContext, check_complete, gather_by_key
from rankshard.evaluate.perturbation_rank import (SCALARS as DELTA_SCALARS, isotropic_in_image, save_curves,
                                                  summarize as delta_summary)
from rankshard.evaluate.plots import curve_from_rows, plot_delta_rank, plot_gaps, plot_rank_path, plot_spectra
from rankshard.evaluate.results import safe_name, write_csv, write_result
from rankshard.evaluate.robustness import Extras, PGDEvalConfig, pgd_records, summarize_pgd, summarize_rank_path
from rankshard.evaluate.spectrum import SpectrumConfig, spectrum_records, summarize_spectrum
from rankshard.evaluate.tables import markdown_table, pgd_table_rows


def _batches(data: EvalData, ctx: DistContext, desc: str, quiet: bool = False) -> Iterator:
    """This rank's batches, with a progress bar (images/s, ETA) on rank 0: attacks and spectra take hours."""
    bar = Progress(data.samples_of(ctx.rank, ctx.world_size), desc, enabled=ctx.is_main and not quiet)
    for batch in data.batches(ctx.rank, ctx.world_size):
        yield batch
        bar.update(len(batch.keys))
    bar.close()


def _gathered(records: dict, data: EvalData, ctx: DistContext, what: str) -> dict | None:
    merged = gather_by_key(records, ctx)
    if merged is not None:
        check_complete(merged, data.num_samples, what)
    return merged


def _ckpt_config(ckpts: Sequence[LoadedCheckpoint]) -> dict[str, str]:
    return {ck.name: ck.path for ck in ckpts}


def run_accuracy(ckpts: Sequence[LoadedCheckpoint], datasets: Sequence[EvalData], ctx: DistContext,
                 out: str | Path, allow_size_mismatch: bool = False, quiet: bool = False) -> list[dict] | None:
    """Top-1/top-5 of every checkpoint on every data variant; rows on rank 0 (``None`` elsewhere)."""
    rows, files = [], []
    for data in datasets:
        for ck in ckpts:
            check_fits(ck, data, allow_size_mismatch)
            batches = _batches(data, ctx, f"accuracy {ck.name} on {data.name}", quiet)
            merged = _gathered(accuracy_records(ck.model, batches, ctx.device),
                               data, ctx, f"accuracy of {ck.name} on {data.name}")
            if merged is None:
                continue
            rows.append({"checkpoint": ck.name, "trained_on": ck.trained_on, "data": data.name,
                         **summarize_accuracy(merged)})
            files.append(write_csv(Path(out) / f"accuracy-{safe_name(ck.name)}-{safe_name(data.name)}-samples.csv",
                                   [{"key": k, **r} for k, r in merged.items()]))
    if not ctx.is_main:
        return None
    files.append(write_csv(Path(out) / "accuracy.csv", rows))
    write_result(out, "accuracy", {"rows": rows}, device=ctx.device, world_size=ctx.world_size, files=files,
                 config={"checkpoints": _ckpt_config(ckpts), "data": [d.name for d in datasets]})
    return rows


def run_spectrum(ckpts: Sequence[LoadedCheckpoint], data: EvalData, cfg: SpectrumConfig, engine: RankEngine,
                 ctx: DistContext, out: str | Path, allow_size_mismatch: bool = False,
                 quiet: bool = False) -> dict[str, list[dict]] | None:
    """Algorithm 1 for every checkpoint: ``{name: rows}`` on rank 0, files and figures written there."""
    out, results = Path(out), {}
    for ck in ckpts:
        check_fits(ck, data, allow_size_mismatch)
        batches = _batches(data, ctx, f"spectrum {ck.name} ({len(cfg.ranks)} ranks)", quiet)
        records = spectrum_records(ck.model, batches, engine, cfg, ctx.device)
        merged = _gathered(records, data, ctx, f"spectrum of {ck.name} on {data.name}")
        if merged is None:
            continue
        rows = results[ck.name] = summarize_spectrum(merged, cfg.ranks)
        stem = out / f"spectrum-{cfg.mode}-{safe_name(ck.name)}"
        files = [write_csv(stem.with_suffix(".csv"), rows), write_csv(stem.with_name(stem.name + "-samples.csv"), [
            {"key": k, "label": r["label"], "full": r["full"], **{f"rank_{q}": p for q, p in zip(cfg.ranks, r["preds"])}}
            for k, r in merged.items()])]
        # The report redraws the figures from the rows of every checkpoint, so they are not this result's own.
        extra = {"rank_check": low_pass_rank_check(data, cfg)} if cfg.mode == "lowpass" else {}
        write_result(out, "spectrum", {
            "checkpoint": ck.name, "path": ck.path, "trained_on": ck.trained_on, "data": data.name,
            "mode": cfg.mode, "svd": engine.describe(), "rows": rows, **extra},
            config=dataclasses.asdict(cfg), device=ctx.device, world_size=ctx.world_size,
            qualifier=f"{cfg.mode}-{ck.name}", files=files)
    if ctx.is_main:
        spectrum_figures(results, cfg.mode, data.name, out)
    return results if ctx.is_main else None


RANK_CHECK_IMAGES = 32  # float64 SVDs per k: a sample is enough to test a bound that must hold for every image


def low_pass_rank_check(data: EvalData, cfg: SpectrumConfig) -> dict:
    """The paper's appendix hypothesis on this data: measured numeric rank of low-pass images per channel."""
    x = next(iter(data.batches(0, 1))).x[:RANK_CHECK_IMAGES]
    return {"tolerance": "s_max * max(H, W) * eps(float64)", "rows": rank_check(x, [k for k in cfg.ranks if k > 0])}


def spectrum_figures(results: dict[str, list[dict]], mode: str, data_name: str, out: Path) -> list[Path]:
    """``spectrum-MODE.png`` (all checkpoints) and, with two or more, ``spectrum-MODE-gap.png``."""
    curves = [curve_from_rows(name, rows) for name, rows in results.items()]
    paths = [plot_spectra(curves, mode, f"{mode}-rank spectrum on {data_name}", out / f"spectrum-{mode}.png")]
    if len(curves) > 1:
        paths.append(plot_gaps(curves, mode, f"top-1 gap vs {curves[0].name} ({data_name})",
                               out / f"spectrum-{mode}-gap.png"))
    return paths


def run_pgd(ckpts: Sequence[LoadedCheckpoint], data: EvalData, cfg: PGDEvalConfig, ctx: DistContext,
            out: str | Path, allow_size_mismatch: bool = False, quiet: bool = False,
            extras: Extras = Extras()) -> list[dict] | None:
    """PGD metrics for every checkpoint; per-sample CSVs, ``pgd.csv``/``pgd.md``/``pgd.json`` on rank 0; and
    what ``extras`` asks for (the perturbations' rank structure, Algorithm 1 on clean and adversarial inputs)."""
    out, rows, files, profiles, paths = Path(out), [], [], {}, {}
    for ck in ckpts:
        check_fits(ck, data, allow_size_mismatch)
        batches = _batches(data, ctx, f"PGD {ck.name}", quiet)
        records = pgd_records(ck.model, batches, data.num_classes, cfg, ctx.device, extras)
        merged = _gathered(records, data, ctx, f"PGD on {ck.name} with {data.name}")
        if merged is None:
            continue
        rows.append({"checkpoint": ck.name, "trained_on": ck.trained_on, "data": data.name,
                     **summarize_pgd(merged, cfg.attack.targeted)})
        stem = f"pgd-{safe_name(ck.name)}"
        if extras.delta_rank:
            profiles[ck.name] = delta_summary(merged)
            rows[-1] |= {f"delta_{name}": profiles[ck.name][name] for name in DELTA_SCALARS}
            files.append(save_curves(out / f"{stem}-delta-rank.npz", merged))
        if extras.spectrum is not None:
            ranks = extras.spectrum.ranks
            paths[ck.name] = summarize_rank_path(merged, ranks, cfg.attack.targeted)
            files.append(write_csv(out / f"{stem}-spectrum-samples.csv", [
                {"key": k, "label": r["label"], "target": r["target"],
                 **{f"{side}_rank_{q}": p for side in ("clean", "adv") for q, p in zip(ranks, r[f"{side}_at_rank"])}}
                for k, r in merged.items()]))
        files.append(write_csv(out / f"{stem}-samples.csv", [{"key": k, **per_sample_fields(r)} for k, r in merged.items()]))
    if not ctx.is_main:
        return None
    files.append(write_csv(out / "pgd.csv", rows))
    attack = dataclasses.asdict(cfg.attack) | {"alpha": cfg.attack.alpha, "seed": cfg.seed}
    body, figures = {"attack": attack, "rows": rows}, []
    if extras.delta_rank:
        body["delta_rank"] = _delta_rank_outputs(profiles, data, cfg, out, figures, files)
    if extras.spectrum is not None:
        body["spectrum"] = _rank_path_outputs(paths, extras, cfg, out, figures, files)
    (out / "pgd.md").write_text(markdown_table(pgd_table_rows(rows)) + f"\n\nAttack: {describe_attack(cfg)}\n")
    write_result(out, "pgd", body, device=ctx.device, world_size=ctx.world_size,
                 config={"checkpoints": _ckpt_config(ckpts), "data": data.name, "attack": attack} | extras_config(extras),
                 figures=figures, files=files + [out / "pgd.md"])
    return rows


def per_sample_fields(record: dict) -> dict:
    """A PGD record as one CSV row: its scalars (per-k lists and curves have their own files)."""
    return {k: v for k, v in record.items() if not isinstance(v, (list, np.ndarray))}


def extras_config(extras: Extras) -> dict:
    """The measurements asked for, as recorded in the result's ``config`` (absent when none was)."""
    out: dict = {"delta_rank": True} if extras.delta_rank else {}
    if extras.spectrum is not None:
        out["spectrum"] = {"ranks": list(extras.spectrum.ranks), "svd": extras.engine.describe()}
    return out


def _delta_rank_outputs(profiles: dict[str, dict], data: EvalData, cfg: PGDEvalConfig, out: Path,
                        figures: list[Path], files: list[Path]) -> dict:
    """The perturbations' mean rank curves per checkpoint: ``pgd-delta-rank.png`` and ``.csv``; the JSON body."""
    isotropic = isotropic_in_image(*data.image_size)
    table = [{"checkpoint": name, "k": k + 1, "spectrum": p["spectrum"][k], "in_image": p["in_image"][k],
              "isotropic_in_image": float(isotropic[k])}
             for name, p in profiles.items() for k in range(len(p["spectrum"]))]
    files.append(write_csv(out / "pgd-delta-rank.csv", table))
    figures.append(plot_delta_rank(profiles, isotropic, f"rank structure of the perturbation: {describe_attack(cfg)}",
                                   out / "pgd-delta-rank.png"))
    files.append(figures[-1])
    return {"isotropic_in_image": isotropic, "checkpoints": profiles}


def _rank_path_outputs(paths: dict[str, list[dict]], extras: Extras, cfg: PGDEvalConfig, out: Path,
                       figures: list[Path], files: list[Path]) -> dict:
    """Algorithm 1 on clean and adversarial inputs per checkpoint: ``pgd-spectrum.png`` and ``.csv``; the JSON body."""
    files.append(write_csv(out / "pgd-spectrum.csv", [{"checkpoint": name, **row} for name, rows in paths.items()
                                                       for row in rows]))
    figures.append(plot_rank_path(paths, cfg.attack.targeted, f"rank-k truncation of clean and adversarial inputs: "
                                  f"{describe_attack(cfg)}", out / "pgd-spectrum.png"))
    files.append(figures[-1])
    return {"ranks": list(extras.spectrum.ranks), "svd": extras.engine.describe(), "checkpoints": paths}


def describe_attack(cfg: PGDEvalConfig) -> str:
    """E.g. ``targeted PGD-20, linf eps=0.01569 (4.00/255), step 0.00196, 1 restart(s), seed 0``."""
    a = cfg.attack
    eps = f"{a.eps:.5g} ({a.eps * 255:.2f}/255)" if a.norm == "linf" else f"{a.eps:.5g}"
    return (f"{'targeted' if a.targeted else 'untargeted'} PGD-{a.steps}, {a.norm} eps={eps}, step {a.alpha:.5g}, "
            f"{a.restarts} restart(s), seed {cfg.seed}")
