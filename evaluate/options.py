"""Click options shared by every ``rankshard-evaluate`` subcommand, and the setup they all do.

One definition per option, so the same thing has the same name, default and help everywhere: ``--data ROOT``
(+ ``--dataset``, ``--split``), ``--out`` (required wherever something is written), ``--device``,
``--workers``, ``--quiet`` (``preprocess.options``' one definition), ``--trust-checkpoint``, ``--config``
(``preprocess.configfile``) and the ``[NAME=]CKPT`` arguments.
"""
from __future__ import annotations

from pathlib import Path

import click
import torch.distributed as dist

from rankshard.evaluate.checkpoints import LoadedCheckpoint, load_checkpoints
from rankshard.evaluate.data import EvalData, shard_data
from rankshard.evaluate.distributed import DistContext, init_from_env
from rankshard.evaluate.errors import EvaluationError
from rankshard.preprocess.configfile import config_option
from rankshard.preprocess.options import quiet_option
from rankshard.preprocess.rank import BACKEND_NAMES

SPLIT_DEFAULT = "test"  # CIFAR-10 has no val split; ImageNet users pass --split val


def _stack(options):
    def apply(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn
    return apply


def checkpoints_argument(single: bool = False):
    """``[NAME=]CKPT...`` (or exactly one with ``single``), parsed by ``checkpoints.split_names``."""
    return click.argument("checkpoints", nargs=1 if single else -1, required=True,
                          metavar="[NAME=]CKPT" if single else "[NAME=]CKPT...")


def out_option(what: str):
    return click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
                        help=f"Folder for {what} (created).")


device_option = click.option("--device", default="auto", show_default=True,
                             help="auto (CUDA when present; cuda:LOCAL_RANK under torchrun), cpu or cuda[:i].")
trust_option = click.option("--trust-checkpoint", is_flag=True,
                            help="Allow full unpickling of checkpoints that weights_only loading refuses "
                                 "(it runs code from the file: trusted files only).")


svd_backend_option = click.option(
    "--svd-backend", type=click.Choice(("auto", *BACKEND_NAMES)), default="auto", show_default=True,
    help="Rank engine backend (auto: checked against float64 SVD; see rankshard-preprocess --backend).")


def rank_engine(backend: str, device):
    """The rank engine for ``--svd-backend``; a backend this device cannot run (cupy or torch-gesvdj on a CPU)
    is a user error naming the option and what runs here, not a traceback."""
    from rankshard.preprocess.rank.engine import RankEngine

    try:
        return RankEngine(backend, device)
    except (ValueError, RuntimeError) as exc:
        raise EvaluationError(f"--svd-backend {backend}: {exc}") from None


def workers_option(help_text: str = "Loader worker processes per process."):
    return click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True, help=help_text)


def data_root_options(required: bool = True, alternative: str = ""):
    """--data ROOT, --dataset, --split, --verify-shards: the shard layout ROOT/<dataset>/<split>/<variant>/
    (``alternative``: the other input source when --data is optional)."""
    return _stack([
        click.option("--data", "root", type=click.Path(exists=True, file_okay=False, path_type=Path),
                     required=required, help="Shard root: ROOT/<dataset>/<split>/<variant>/ as written by "
                                             f"rankshard-preprocess{alternative}."),
        click.option("--dataset", default=None, help="Dataset folder under ROOT (default: the only one there)."),
        click.option("--split", default=SPLIT_DEFAULT, show_default=True, help="Split to read (test, val, ...)."),
        click.option("--verify-shards/--no-verify-shards", default=True, show_default=True,
                     help="Check each shard's sha256 against its manifest before reading it."),
    ])


def checkpoint_options(fn):
    """--config, CKPT... ([NAME=]PATH), --out, --device, --trust-checkpoint, --allow-size-mismatch, --quiet."""
    return _stack([
        config_option, checkpoints_argument(), out_option("CSV/JSON/PNG results"), device_option, trust_option,
        click.option("--allow-size-mismatch", is_flag=True,
                     help="Evaluate even if the checkpoint's input_size differs from the data's image size."),
        quiet_option,
    ])(fn)


def data_options(variant: bool = True):
    """--data ROOT, --dataset, --split, [--variant], --limit, --batch-size, --workers, --verify-shards."""
    options = [
        data_root_options(),
        click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate only the first N samples of the manifest order."),
        click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True, help="Images per loader batch, per process."),
        workers_option(),
    ]
    if variant:
        options.insert(1, click.option("--variant", default="full", show_default=True,
                                       help="Shard variant the inputs come from (full, rank-010, ...)."))
    return _stack(options)


def setup(checkpoints, device: str, trust_checkpoint: bool) -> tuple[DistContext, list[LoadedCheckpoint]]:
    """Join torchrun's process group (if any) and load the checkpoints onto this process's device."""
    ctx = init_from_env(device)
    return ctx, load_checkpoints(checkpoints, ctx.device, trust=trust_checkpoint)


def open_data(root, dataset, split, variant, batch_size, workers, limit, verify_shards=True) -> EvalData:
    return shard_data(root, dataset, split, variant, batch_size=batch_size, workers=workers, limit=limit,
                      verify_shards=verify_shards)


def finish(ctx: DistContext, message: str) -> None:
    """Print the summary on rank 0 and leave the process group cleanly."""
    if ctx.is_main:
        click.echo(message)
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
