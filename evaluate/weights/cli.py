"""``rankshard-evaluate weights CKPT... [--layers PATTERN] [--input-size N] [--out DIR]``.

The command is built around a loader so that this module does not fix how checkpoints are read; the
evaluate CLI wires it with ``make_weights_command(rankshard.train.checkpoint.model_from_checkpoint)``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click
from torch import nn

from rankshard.evaluate.weights.spectra import WeightsConfig
from rankshard.evaluate.checkpoints import split_names
from rankshard.evaluate.weights.report import ReportConfig, run_weights_analysis

LoadModel = Callable[..., tuple[nn.Module, dict[str, Any]]]  # (path, trust=bool) -> (model, meta)


def make_weights_command(load_model: LoadModel) -> click.Command:
    """The click command; ``load_model(path, trust=...)`` returns ``(model, meta)``."""

    @click.command("weights")
    @click.argument("checkpoints", nargs=-1, required=True, metavar="[NAME=]CKPT...")
    @click.option("--layers", default="*", show_default=True,
                  help="Comma-separated fnmatch patterns over module names, e.g. 'layer1.*,fc'.")
    @click.option("--input-size", type=int, default=None,
                  help="Probe resolution; default: the checkpoint's input_size, else 224.")
    @click.option("--out", "out_dir", type=click.Path(file_okay=False), default="weights-report",
                  show_default=True)
    @click.option("--top-k", type=int, default=8, show_default=True, help="Singular vectors kept per layer.")
    @click.option("--seed", type=int, default=0, show_default=True, help="Seed of the permuted baselines.")
    @click.option("--no-operator", is_flag=True, help="Skip the exact operator spectra (unfolded SVD only).")
    @click.option("--no-permuted", is_flag=True, help="Skip the randomly permuted baselines.")
    @click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
    @click.option("--esd-layers", type=int, default=16, show_default=True, help="ESD panels per model.")
    @click.option("--zero-top-k", type=int, default=0, show_default=True,
                  help="Top-k singular values of each conv's zero-padded operator (its exact Lipschitz constant "
                       "is the first), by Lanczos; 0 skips it (costly on CPU: hundreds of conv passes a layer).")
    @click.option("--device", default="cpu", show_default=True, help="Device of the zero-padded operator.")
    @click.option("--sensitivity", is_flag=True, help="Per-filter d sigma_max / d W (sensitivity.png|npz).")
    @click.option("--ww-conventions", is_flag=True,
                  help="Also fit alpha as WeightWatcher does (per-kernel-position slices): ww_* columns.")
    @click.option("--trust-checkpoint", is_flag=True,
                  help="Allow full unpickling (only for checkpoints from a source you trust).")
    def weights_command(checkpoints, layers, input_size, out_dir, top_k, seed, no_operator, no_permuted, dtype,
                        esd_layers, zero_top_k, device, sensitivity, ww_conventions, trust_checkpoint):
        """SVD of every Conv2d/Linear weight: unfolded and exact operator spectra, RMT fits, figures."""
        models, sizes = {}, set()
        for name, path in split_names(checkpoints):  # the naming every evaluate subcommand uses
            model, meta = load_model(path, trust=trust_checkpoint)
            models[name] = model
            sizes.add(int(meta.get("input_size", 224)))
        if input_size is None and len(sizes) > 1:
            raise click.UsageError(f"checkpoints were trained at different input sizes {sorted(sizes)}; "
                                   f"pass --input-size to analyse them at one resolution")
        size = input_size or sizes.pop()
        cfg = WeightsConfig(top_k=top_k, seed=seed, operator=not no_operator, permuted=not no_permuted,
                            dtype=dtype, zero_top_k=zero_top_k, device=device, sensitivity=sensitivity,
                            ww_conventions=ww_conventions)
        try:
            results = run_weights_analysis(models, size, out_dir, layers, cfg, ReportConfig(esd_layers=esd_layers))
        except ValueError as err:
            raise click.UsageError(str(err)) from err
        for name, res in results.items():
            click.echo(f"{name}: {len(res)} layers analysed at {size}x{size} in "
                       f"{sum(r.seconds for r in res):.1f} s -> {Path(out_dir) / name}")

    return weights_command
