"""The stages of a study and their digests, level by level (a level's digests need the outputs of the last).

Digests are content-based where content exists: a training run depends on the sha256 of the shards it reads
(from their manifests), not on the materialization's settings, so adding a variant to ``[materialize]``
re-materializes (same bytes for the old variants) but retrains nothing.
"""
from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

from rankshard.evaluate.study.config import StudyConfig, StudyConfigError, plain
from rankshard.evaluate.study.runner import Outcome, Stage, Study, StudyProgress, digest

TRAIN_SPLIT = "train"
TRAIN_TEST_SPLIT = "test"  # rankshard-train picks best.pt on the "test" split (train/data.py)


def materialize_stage(study: Study) -> Stage:
    cfg = study.cfg
    data, mat = dataclasses.asdict(cfg.data), dataclasses.asdict(cfg.materialize)
    job = {"data": plain(data), "materialize": plain(mat), "out": str(study.out / "shards"),
           "scratch": str(study.out / "source"), "workers": study.workers, "device": study.device}
    outputs = tuple(str(study.out / "shards" / cfg.data.dataset / s) for s in cfg.data.splits)
    return Stage("materialize", "materialize", job, digest({"data": job["data"], "materialize": job["materialize"]}),
                 outputs)


def variant_digest(shards: Path, dataset: str, split: str, variant: str) -> str:
    """Digest of one variant's bytes: the sha256 of its shards, as listed in its manifest."""
    path = shards / dataset / split / variant / "manifest.json"
    if not path.is_file():
        have = sorted(p.name for p in path.parent.parent.iterdir()) if path.parent.parent.is_dir() else []
        raise StudyConfigError(f"{dataset}/{split}/{variant} was not materialized (have: {', '.join(have) or 'none'}); "
                               "add it to [materialize] (ranks = [...] -> rank-%03d, lowpass = [...] -> lowpass-%03d)")
    manifest = json.loads(path.read_text())
    return digest([s["sha256"] for s in manifest["shards"]])


def checkpoint_name(variant: str, seed: int) -> str:
    """``rank-004-seed1``: the report groups labels ending in ``seed<N>`` into seed groups (evaluate.comparisons)."""
    return f"{variant}-seed{seed}"


def train_stages(study: Study) -> list[Stage]:
    from rankshard.train.config import config_hash, from_preset

    cfg, shards = study.cfg, study.out / "shards"
    stages = []
    for variant in cfg.train.variants:
        for seed in cfg.train.seeds:
            overrides = {**plain(cfg.train.overrides), "train_variant": variant, "seed": seed,
                         "data_root": str(shards), "dataset": cfg.data.dataset, "device": study.device.split(":")[0],
                         "workers": study.workers}
            tcfg = from_preset(cfg.train.preset, overrides)
            reads = [(TRAIN_SPLIT, variant), (TRAIN_TEST_SPLIT, tcfg.test_variant)]
            reads += [(TRAIN_TEST_SPLIT, v) for v in tcfg.extra_variants]
            inputs = {f"{s}/{v}": variant_digest(shards, cfg.data.dataset, s, v) for s, v in reads}
            # data_root is where, not what: moving the study folder must not retrain
            body = {"train": config_hash(dataclasses.replace(tcfg, data_root="")), "inputs": inputs}
            name = checkpoint_name(variant, seed)
            run_dir = study.out / "runs" / name
            job = {"config": tcfg.to_json(), "out": str(run_dir), "name": name}
            stages.append(Stage(f"train/{name}", "train", job, digest(body), (str(run_dir / cfg.train.checkpoint),)))
    return stages


def _eval_variants(options: dict) -> list[str]:
    variant = options.get("variant", "full")
    return list(variant) if isinstance(variant, list) else [variant]


# Evaluation options that change how a result is computed, never what it is (as train's RUNTIME_FIELDS): left out
# of the digest, so more loader workers or skipping the shard check does not redo a finished evaluation.
RUNTIME_OPTIONS = ("workers", "verify_shards", "quiet")


def result_options(options: dict) -> dict:
    return {k: v for k, v in options.items() if k.replace("-", "_") not in RUNTIME_OPTIONS}


def eval_stages(study: Study, trains: list[Stage]) -> list[Stage]:
    cfg, shards = study.cfg, study.out / "shards"
    stages = []
    for ev in cfg.evaluations:
        options = plain(ev.options) or {}
        inputs = {v: variant_digest(shards, cfg.data.dataset, ev.split, v) for v in _eval_variants(options)}
        for tr in trains:
            name = tr.job["name"]
            out = study.out / "eval" / ev.name / name
            job = {"command": ev.command, "options": options, "split": ev.split, "checkpoint_name": name,
                   "checkpoint": str(Path(tr.job["out"]) / cfg.train.checkpoint), "out": str(out),
                   "data_root": str(shards), "dataset": cfg.data.dataset, "device": study.device,
                   "workers": study.workers}
            # the run's digest says which training, the file name which of its checkpoints (best.pt, last.pt);
            # best.pt, the default, leaves the digest as studies made before the name counted have it, so an
            # upgrade does not redo every evaluation
            body = {"command": ev.command, "split": ev.split, "options": result_options(options),
                    "checkpoint": tr.digest, "inputs": inputs}
            if cfg.train.checkpoint != "best.pt":
                body["checkpoint_file"] = cfg.train.checkpoint
            stages.append(Stage(f"eval/{ev.name}/{name}", "evaluate", job, digest(body), (str(out),)))
    return stages


def report_stage(study: Study, trains: list[Stage], evals: list[Stage]) -> Stage:
    out = study.out / "report"
    job = {"sources": [s.job["out"] for s in evals], "runs": [s.job["out"] for s in trains], "out": str(out)}
    return Stage("report", "report", job, digest(sorted((s.id, s.digest) for s in trains + evals)),
                 (str(out / "report.html"),))


def stage_counts(cfg: StudyConfig) -> Counter:
    runs = len(cfg.train.variants) * len(cfg.train.seeds)
    return Counter({"materialize": 1, "train": runs, "evaluate": runs * len(cfg.evaluations),
                    "report": int(cfg.report)})


def run_study(study: Study) -> Outcome:
    """Every stage in order, skipping those up to date; returns what ran and what was skipped."""
    study.out.mkdir(parents=True, exist_ok=True)
    progress = StudyProgress(stage_counts(study.cfg), study._history(), study.log)
    outcome = Outcome()
    study.run_level([materialize_stage(study)], progress, outcome)
    trains = train_stages(study)
    study.run_level(trains, progress, outcome)
    evals = eval_stages(study, trains)
    study.run_level(evals, progress, outcome)
    if study.cfg.report:
        report = report_stage(study, trains, evals)
        study.run_level([report], progress, outcome)
        outcome.report = Path(report.job["out"]) / "report.html"
    _write_plan(study, trains, evals)
    return outcome


def _write_plan(study: Study, trains: list[Stage], evals: list[Stage]) -> None:
    """``study.json``: the resolved study and every stage's digest (what a rerun compares against)."""
    body = {"format": "rankshard-study/1", "name": study.cfg.name,
            "config": plain(dataclasses.asdict(study.cfg)),
            "stages": {s.id: s.digest for s in trains + evals}}
    (study.out / "study.json").write_text(json.dumps(body, indent=1, default=str) + "\n")
