"""``rankshard-train``: train a ResNet on rank-k shards from a preset plus command-line overrides.

Every ``TrainConfig`` field is an option (``--lr 0.2``, ``--milestones 100,150``, ``--nesterov``,
``--extra-variants rank-005,high-003``); the resolved config is printed and saved as
``RUN_DIR/config.json``. Multi-GPU / multi-node: launch the same command under ``torchrun``.
"""
from __future__ import annotations

import json
from dataclasses import Field
from pathlib import Path
from typing import Any, Callable

import click

from rankshard.preprocess.errors import friendly_errors
from rankshard.preprocess.options import quiet_flag
from rankshard.train.config import PRESETS, ConfigError, TrainConfig, apply_overrides, dataclass_fields, from_preset

DEFAULT_PRESET = "cifar10-paper"
# Exit statuses (the shared policy of preprocess.errors.friendly_errors): 2 for a user mistake (config, data,
# checkpoint), 3 when training diverged (TrainingDiverged.exit_code), 75 when a stop signal ended it early
# (TrainingStopped.exit_code: last.pt saved, --resume continues).


def _field_option(f: Field) -> Callable:
    """One click option per config field; value None means "keep the preset's value"."""
    flag = f.name.replace("_", "-")
    help_text = f.metadata.get("help", "")
    if isinstance(f.default, bool):
        return click.option(f"--{flag}/--no-{flag}", f.name, default=None, help=help_text)
    flags = f.metadata.get("flags") or (f"--{flag}",)
    return click.option(*flags, f.name, type=str, default=None, metavar=type(f.default).__name__.upper(),
                        help=help_text + (" (comma-separated)" if isinstance(f.default, tuple) else ""))


def config_options(fn: Callable) -> Callable:
    """Decorate ``fn`` with an option for every ``TrainConfig`` field."""
    for f in reversed(dataclass_fields()):
        fn = _field_option(f)(fn)
    return fn


def resolve_config(preset: str | None, resume_dir: Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """The run's config: ``preset`` (or, when resuming without one, the run folder's saved config) with
    ``overrides`` applied; ``rundir.prepare`` then refuses any difference from a saved config."""
    from rankshard.train.rundir import read_config

    given = {k: v for k, v in overrides.items() if v is not None}
    if resume_dir is not None and preset is None:
        return apply_overrides(read_config(resume_dir), given)
    return from_preset(preset or DEFAULT_PRESET, given)


def _list_presets(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    for name, cfg in PRESETS.items():
        click.echo(f"{name}: {cfg.arch} ({cfg.model_variant} stem), {cfg.epochs} epochs, batch {cfg.batch_size}, "
                   f"lr {cfg.lr}{' per ' + str(cfg.lr_reference_batch) if cfg.lr_reference_batch else ''}, "
                   f"{cfg.schedule}, wd {cfg.weight_decay}, label smoothing {cfg.label_smoothing}")
    ctx.exit(0)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--preset", type=click.Choice(list(PRESETS)), default=None,
              help=f"Starting values of every field (default {DEFAULT_PRESET}; with --resume: the saved config).")
@click.option("--out", "--run-dir", "run_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run folder: config.json, metrics.jsonl, curves.png, last.pt, best.pt (--run-dir: same).")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Continue the run in this folder from its last.pt (model, optimizer, schedule, RNG, data position).")
@click.option("--resume-from", metavar="FILE", default=None,
              help="With --resume: continue from this checkpoint of the run folder (last.prev.pt, epoch-NNNN.pt) "
                   "instead of last.pt, e.g. when last.pt is damaged.")
@click.option("--overwrite", is_flag=True, help="Delete the run folder's checkpoints and metrics and start again.")
@click.option("--print-config", is_flag=True, help="Print the resolved config as JSON and exit.")
@click.option("--stop-after-epochs", type=click.IntRange(min=1), default=None,
              help="Stop after this many epochs in this invocation (time-limited jobs); --resume continues.")
@quiet_flag("No per-step progress lines (epoch summaries and errors still print).")
@click.option("--list-presets", is_flag=True, expose_value=False, is_eager=True, callback=_list_presets,
              help="Show the presets and exit.")
@config_options
@friendly_errors
def main(preset, run_dir, resume_dir, resume_from, overwrite, print_config, stop_after_epochs, quiet, **overrides):
    """Train a ResNet on rank-k shards (single process, or every process of a torchrun job)."""
    cfg = resolve_config(preset, resume_dir, overrides)
    if print_config:
        click.echo(json.dumps(cfg.to_json(), indent=2))
        return
    if resume_dir is not None and run_dir is not None and Path(run_dir).resolve() != Path(resume_dir).resolve():
        raise ConfigError(f"--out {run_dir} and --resume {resume_dir} name different folders; give one")
    if resume_from is not None and resume_dir is None:
        raise ConfigError("--resume-from goes with --resume RUN_DIR (it names a checkpoint inside that run)")
    run_dir = resume_dir or run_dir
    if run_dir is None:
        raise ConfigError("--out is required (the run folder: checkpoints and metrics go there)")
    from rankshard.train.run import run

    run(cfg, run_dir, resume=resume_dir is not None, overwrite=overwrite, stop_after_epochs=stop_after_epochs,
        handle_signals=True, progress=not quiet, resume_from=resume_from)


if __name__ == "__main__":
    main()
