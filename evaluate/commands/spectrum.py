"""``rankshard-evaluate spectrum``: accuracy vs input rank (the paper's Algorithm 1)."""
from __future__ import annotations

import click

from rankshard.evaluate.errors import friendly_errors
from rankshard.evaluate.options import (checkpoint_options, data_options, finish, open_data, rank_engine, setup,
                                        svd_backend_option)
from rankshard.evaluate.runs import run_spectrum
from rankshard.evaluate.spectrum import SpectrumConfig, parse_ranks
from rankshard.evaluate.tables import markdown_table, spectrum_table


@click.command("spectrum")
@checkpoint_options
@data_options()
@click.option("--ranks", default="all", show_default=True,
              help="'all' (0..min(H,W)), an inclusive range '0:32' or '0:224:8', or a list '0,5,10,20'.")
@click.option("--mode", type=click.Choice(["low", "high", "lowpass", "highpass"]), default="low", show_default=True,
              help="low: keep the k largest singular values; high: remove them (x - x_k); lowpass: keep the k x k "
                   "lowest 2-D DFT frequencies per channel; highpass: remove them. With lowpass the result also "
                   "holds the measured rank of the low-pass images (the paper's rank <= k hypothesis).")
@click.option("--forward-batch", type=int, default=256, show_default=True,
              help="Rank-k images per forward pass (several ranks of one batch stacked).")
@svd_backend_option
@friendly_errors
def command(checkpoints, out, device, trust_checkpoint, allow_size_mismatch, root, dataset, split, variant, limit,
            batch_size, workers, verify_shards, quiet, ranks, mode, forward_batch, svd_backend):
    """Top-1 and agreement with the full-rank prediction at every requested rank, one SVD per image;
    per-checkpoint CSV/JSON, spectrum-MODE.png (all checkpoints) and spectrum-MODE-gap.png (vs the first)."""
    data = open_data(root, dataset, split, variant, batch_size, workers, limit, verify_shards)
    cfg = SpectrumConfig(parse_ranks(ranks, min(data.image_size)), mode, forward_batch)
    ctx, ckpts = setup(checkpoints, device, trust_checkpoint)
    engine = rank_engine(svd_backend, ctx.device)
    results = run_spectrum(ckpts, data, cfg, engine, ctx, out, allow_size_mismatch, quiet)
    table = spectrum_table(results) if results else None
    summary = f"{table.caption}\n\n{markdown_table(table.rows)}" if table else ""
    finish(ctx, f"{summary}\n\nwritten to {out}/ (spectrum-{mode}-*.csv/json, spectrum-{mode}.png)")
