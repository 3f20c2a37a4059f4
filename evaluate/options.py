"""Click options shared by the evaluation subcommands, and the setup they all do (devices, data, models)."""
from __future__ import annotations

from pathlib import Path

import click
import torch.distributed as dist

from rankshard.evaluate.checkpoints import LoadedCheckpoint, load_checkpoints
from rankshard.evaluate.data import EvalData, shard_data
from rankshard.evaluate.distributed import DistContext, init_from_env


def _stack(options):
    def apply(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn
    return apply


def checkpoint_options(fn):
    """CKPT... ([NAME=]PATH), --device, --trust-checkpoint, --allow-size-mismatch, --out."""
    return _stack([
        click.argument("checkpoints", nargs=-1, required=True),
        click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
                     help="Folder for CSV/JSON/PNG results (created)."),
        click.option("--device", default="auto", show_default=True,
                     help="auto (CUDA when present; cuda:LOCAL_RANK under torchrun), cpu or cuda[:i]."),
        click.option("--trust-checkpoint", is_flag=True,
                     help="Allow full unpickling of checkpoints that weights_only loading refuses (trusted files only)."),
        click.option("--allow-size-mismatch", is_flag=True,
                     help="Evaluate even if the checkpoint's input_size differs from the data's image size."),
    ])(fn)


def data_options(split_default: str = "test", variant: bool = True):
    """--data ROOT, --dataset, --split, [--variant], --limit, --batch-size, --workers."""
    options = [
        click.option("--data", "root", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
                     help="Shard root: ROOT/<dataset>/<split>/<variant>/ as written by rankshard-preprocess."),
        click.option("--dataset", default=None, help="Dataset folder under ROOT (default: the only one there)."),
        click.option("--split", default=split_default, show_default=True, help="Split to evaluate (test, val, ...)."),
        click.option("--limit", type=int, default=None, help="Evaluate only the first N samples (keys 0..N-1)."),
        click.option("--batch-size", type=int, default=128, show_default=True, help="Images per loader batch, per process."),
        click.option("--workers", type=int, default=2, show_default=True, help="Loader worker processes per process."),
    ]
    if variant:
        options.insert(3, click.option("--variant", default="full", show_default=True,
                                       help="Shard variant the inputs come from (full, rank-010, ...)."))
    return _stack(options)


def setup(checkpoints, device: str, trust_checkpoint: bool) -> tuple[DistContext, list[LoadedCheckpoint]]:
    """Join torchrun's process group (if any) and load the checkpoints onto this process's device."""
    ctx = init_from_env(device)
    return ctx, load_checkpoints(checkpoints, ctx.device, trust=trust_checkpoint)


def open_data(root, dataset, split, variant, batch_size, workers, limit) -> EvalData:
    return shard_data(root, dataset, split, variant, batch_size=batch_size, workers=workers, limit=limit)


def finish(ctx: DistContext, message: str) -> None:
    """Print the summary on rank 0 and leave the process group cleanly."""
    if ctx.is_main:
        click.echo(message)
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
