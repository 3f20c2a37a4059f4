"""``rankshard-evaluate accuracy``: top-1 and top-5 of checkpoints on one or more data variants."""
from __future__ import annotations

import click

from rankshard.evaluate.errors import friendly_errors
from rankshard.evaluate.options import checkpoint_options, data_options, finish, open_data, setup
from rankshard.evaluate.runs import run_accuracy
from rankshard.evaluate.tables import accuracy_table_rows, markdown_table


@click.command("accuracy")
@checkpoint_options
@data_options(variant=False)
@click.option("--variant", "variants", multiple=True, default=("full",), show_default=True,
              help="Data variant(s) to evaluate on; repeat for several (--variant full --variant rank-010).")
@friendly_errors
def command(checkpoints, out, device, trust_checkpoint, allow_size_mismatch, quiet, root, dataset, split, limit,
            batch_size, workers, verify_shards, variants):
    """Top-1/top-5 of each CKPT ([NAME=]PATH) on each --variant; accuracy.csv/json in --out."""
    ctx, ckpts = setup(checkpoints, device, trust_checkpoint)
    datasets = [open_data(root, dataset, split, v, batch_size, workers, limit, verify_shards) for v in variants]
    rows = run_accuracy(ckpts, datasets, ctx, out, allow_size_mismatch, quiet)
    finish(ctx, markdown_table(accuracy_table_rows(rows or [])) + f"\n\nwritten to {out}/accuracy.csv")
