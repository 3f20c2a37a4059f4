"""``rankshard-evaluate weights CKPT... --out DIR``: SVD of every conv/linear layer of stored checkpoints."""
from __future__ import annotations

import click

from rankshard.preprocess.devices import resolve_device

from rankshard.evaluate.checkpoints import common_input_size, load_checkpoints
from rankshard.evaluate.errors import EvaluationError, friendly_errors
from rankshard.evaluate.options import checkpoints_argument, out_option, quiet_option, trust_option, workers_option
from rankshard.evaluate.weights.report import ReportConfig, run_weights_analysis
from rankshard.evaluate.weights.spectra import WeightsConfig
from rankshard.preprocess.configfile import config_option


def _config(top_k, seed, no_operator, no_permuted, dtype, zero_top_k, device, sensitivity,
            ww_conventions) -> WeightsConfig:
    try:
        return WeightsConfig(top_k=top_k, seed=seed, operator=not no_operator, permuted=not no_permuted, dtype=dtype,
                             zero_top_k=zero_top_k, device=device, sensitivity=sensitivity,
                             ww_conventions=ww_conventions)
    except ValueError as err:
        raise EvaluationError(str(err)) from None


@click.command("weights")
@config_option
@checkpoints_argument()
@out_option("weights.json, per-model tables (CSV/JSON), singular vectors and figures")
@click.option("--layers", default="*", show_default=True,
              help="Comma-separated fnmatch patterns over module names, e.g. 'layer1.*,fc'.")
@click.option("--input-size", type=click.IntRange(min=1), default=None,
              help="Probe resolution; default: the checkpoints' input_size, else 224.")
@click.option("--top-k", type=int, default=8, show_default=True, help="Singular vectors kept per layer.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the permuted baselines.")
@click.option("--no-operator", is_flag=True, help="Skip the exact operator spectra (unfolded SVD only).")
@click.option("--no-permuted", is_flag=True, help="Skip the randomly permuted baselines.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--esd-layers", type=int, default=16, show_default=True, help="ESD panels per model.")
@click.option("--zero-top-k", type=click.IntRange(min=0), default=0, show_default=True,
              help="Top-k singular values of each conv's zero-padded operator (the first is its exact Lipschitz "
                   "constant), by Lanczos; 0 skips it (costly on CPU: hundreds of conv passes a layer).")
@click.option("--device", default="auto", show_default=True,
              help="Device of the zero-padded operator's Lanczos: auto (this process's GPU when present), cpu, "
                   "cuda, cuda:N. The other spectra run on the CPU.")
@click.option("--sensitivity", is_flag=True, help="Per-filter d sigma_max / d W (sensitivity.png|npz).")
@click.option("--ww-conventions", is_flag=True,
              help="Also fit alpha as WeightWatcher does (per-kernel-position slices): ww_* columns.")
@workers_option("Threads analysing layers in parallel (0: one per CPU core). The analysis runs on the CPU.")
@trust_option
@quiet_option
@friendly_errors
def command(checkpoints, out, layers, input_size, top_k, seed, no_operator, no_permuted, dtype, esd_layers,
            zero_top_k, device, sensitivity, ww_conventions, workers, trust_checkpoint, quiet):
    """SVD of every Conv2d/Linear weight: unfolded, circular- and zero-padded operator spectra, RMT fits
    with reliability flags, optional singular-value sensitivity, figures."""
    device = str(resolve_device(device))  # the one device rule: auto, cuda without a GPU -> clear error
    cfg = _config(top_k, seed, no_operator, no_permuted, dtype, zero_top_k, device, sensitivity, ww_conventions)
    ckpts = load_checkpoints(checkpoints, "cpu", trust=trust_checkpoint)
    size = input_size or common_input_size(ckpts, "pass --input-size to analyse them at one resolution") or 224
    try:
        results = run_weights_analysis({ck.name: ck.model for ck in ckpts}, size, out, layers, cfg,
                                       ReportConfig(esd_layers=esd_layers), workers or None, quiet)
    except ValueError as err:  # a --layers pattern that matches nothing
        raise EvaluationError(str(err)) from None
    for name, res in results.items():
        click.echo(f"{name}: {len(res)} layers analysed at {size}x{size} in "
                   f"{sum(r.seconds for r in res):.1f} s -> {out / name}")
    click.echo(f"result: {out / 'weights.json'}")
