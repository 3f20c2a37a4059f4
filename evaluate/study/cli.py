"""``rankshard-study``: run a study file end to end (``run``), list or copy the shipped examples (``examples``)."""
from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import click

from rankshard.evaluate.errors import friendly_errors
from rankshard.evaluate.study.config import load_study
from rankshard.evaluate.study.plan import run_study
from rankshard.evaluate.study.runner import Study
from rankshard.preprocess.options import quiet_flag


def example_files() -> dict[str, Path]:
    """``{name: path}`` of the example studies shipped as package data (evaluate/study/examples/)."""
    folder = resources.files("rankshard.evaluate.study") / "examples"
    return {p.name.removesuffix(".toml"): Path(str(p)) for p in folder.iterdir() if p.name.endswith(".toml")}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Run a whole study (materialize, train variants x seeds, evaluate, report) from one TOML file."""


@main.command("run")
@click.argument("study_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Study folder: shards/, runs/, eval/, report/; stages already done there are skipped.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 (every stage).")
@click.option("--workers", type=int, default=2, show_default=True, help="Loader/encoder worker processes per stage.")
@click.option("--jobs", type=int, default=1, show_default=True,
              help="Run this many independent stages (trainings, evaluations) at once, one process each.")
@click.option("--devices", default="", help="Comma-separated devices handed to parallel stages in turn (cuda:0,cuda:1).")
@quiet_flag("No per-stage progress lines (errors and the final summary line still print).")
@friendly_errors
def run_command(study_file, out, device, workers, jobs, devices, quiet):
    """Run STUDY_FILE into --out; a rerun does only what changed (stage digests in OUT/.stages/)."""
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    study = Study(load_study(study_file), out, device, workers, jobs, tuple(d for d in devices.split(",") if d))
    if quiet:
        # the study's log carries only the progress lines: errors raise to friendly_errors, the summary is below
        study.log = _no_progress
    outcome = run_study(study)
    click.echo(f"{len(outcome.ran)} stage(s) run, {len(outcome.skipped)} up to date"
               + (f"; report: {outcome.report}" if outcome.report else ""))


def _no_progress(line: str) -> None:
    """--quiet: the progress lines go nowhere (the stages themselves already run with their own --quiet)."""


@main.command("examples")
@click.option("--copy-to", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Copy the example study files into this folder to edit them.")
def examples_command(copy_to):
    """List the shipped example studies (tiny: demo data on a CPU in minutes; the paper's CIFAR-10 and ImageNet)."""
    for name, path in sorted(example_files().items()):
        if copy_to:
            copy_to.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, copy_to / path.name)
        click.echo(f"{name:16} {copy_to / path.name if copy_to else path}")


if __name__ == "__main__":
    main()
