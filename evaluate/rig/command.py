"""``rankshard-evaluate rig``: Rank Integrated Gradients maps, baselines, figures and sanity checks."""
from __future__ import annotations

import json
from pathlib import Path

import click

from rankshard.preprocess.devices import resolve_device
from rankshard.preprocess.errors import RankshardError, friendly_errors

from rankshard.evaluate.checkpoints import common_input_size, load_checkpoints
from rankshard.evaluate.options import (checkpoints_argument, data_root_options, device_option, out_option,
                                        quiet_option, trust_option, svd_backend_option)
from rankshard.evaluate.rig.attribution import OUTPUTS, REDUCTIONS, RULES, IGConfig, SmoothGradConfig
from rankshard.evaluate.rig.rank_ig import RIGConfig
from rankshard.evaluate.rig.check import RANDOMIZATIONS
from rankshard.evaluate.rig.inputs import InputBatch, load_image_files, parse_index, read_shard_samples
from rankshard.evaluate.rig.maps import METHODS, MapConfig
from rankshard.evaluate.rig.run import RunConfig, check_input_size, run_rig
from rankshard.preprocess.configfile import config_option


def _split_list(values: tuple[str, ...] | str | None) -> list[str]:
    items = [values] if isinstance(values, str) else list(values or ())
    return [v.strip() for item in items for v in item.split(",") if v.strip()]


def _inputs(root, dataset, split, keys, index, images, size: int,
            verify_shards: bool = True) -> tuple[InputBatch, dict]:
    """The images to explain from exactly one of shards (``--data`` with ``--keys``/``--index``) or files."""
    files = _split_list(images)
    if bool(files) == bool(root):
        raise RankshardError("give the images with either --data ROOT (plus --keys or --index) or --images FILE,...")
    if files:
        return load_image_files(files, size), {"kind": "files", "paths": files, "size": size}
    key_list = _split_list(keys) if keys else None
    rng = parse_index(index) if index else None
    batch = read_shard_samples(root, dataset, split, key_list, rng, verify_shards)
    return batch, {"kind": "shards", "root": str(root), "dataset": dataset, "split": split, "keys": key_list,
                   "index": index}


def _map_config(o: dict) -> MapConfig:
    try:
        return MapConfig(
            methods=tuple(_split_list(o["methods"])),
            rig=RIGConfig(o["output"], o["reduction"], o["stride"], o["batch_size"]),
            ig=IGConfig(o["ig_steps"], o["ig_rule"]),
            smoothgrad=SmoothGradConfig(o["sg_samples"], o["sg_sigma"], o["seed"]),
            rank_path_rule=o["rank_path_rule"], rank_path_steps=o["rank_path_steps"])
    except ValueError as exc:
        raise RankshardError(str(exc)) from exc


def _report(summary: dict) -> None:
    for ck in summary["checkpoints"]:
        click.echo(f"{ck['name']}: {len(ck['targets'])} images in {ck['seconds']:.2f} s "
                   f"({ck['images_per_s']:.2f} images/s); classes {ck['targets']}")
        rp = ck.get("rank_path") or ck.get("check_result", {}).get("rank_path")
        if rp:
            click.echo(f"  rank path: max |delta| {rp['max_abs_delta']:.3g} "
                       f"(max relative {rp['max_relative_delta']:.3g})")
        for method, rows in ck.get("check_result", {}).get("spearman", {}).items():
            cells = ", ".join(f"{r['stage']}={r['spearman_mean']:.2f}" for r in rows)
            click.echo(f"  randomization {method}: Spearman {cells}")
        click.echo(f"  maps: {Path(ck['figure']).parent}/*.npy; figure: {ck['figure']}")
    for fig in summary["figures"][len(summary["checkpoints"]):]:
        click.echo(f"comparison figure: {fig}")


@click.command("rig")
@config_option
@checkpoints_argument()
@data_root_options(required=False, alternative="; its `full` variant is read (or give --images)")
@click.option("--keys", help="comma-separated 8-digit sample keys, e.g. 00000003,00000017")
@click.option("--index", help="positions in manifest order, START:STOP, e.g. 0:16")
@click.option("--images", multiple=True, help="image files, comma-separated and/or repeated; resized and "
              "centre-cropped to the checkpoint's input size")
@out_option("rig.json, images.npy, per-checkpoint maps (.npy) and figures")
@click.option("--methods", default="vanilla,rig", show_default=True, help=f"comma-separated: {', '.join(METHODS)}")
@click.option("--output", type=click.Choice(sorted(OUTPUTS)), default="prob", show_default=True,
              help="explained scalar: softmax probability or logit of the full-rank top class")
@click.option("--reduction", type=click.Choice(sorted(REDUCTIONS)), default="max-abs", show_default=True,
              help="colour-channel reduction (max-abs is the paper's/SPEC's)")
@click.option("--stride", type=click.IntRange(min=1), default=1, show_default=True,
              help="evaluate ranks 1, 1+s, ...; each stands for its block of s ranks (block-summed weights)")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="points (ranks, IG steps, noise samples) per forward/backward pass")
@click.option("--ig-steps", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--ig-rule", type=click.Choice(sorted(RULES)), default="gauss-legendre", show_default=True)
@click.option("--sg-samples", type=click.IntRange(min=1), default=25, show_default=True)
@click.option("--sg-sigma", type=click.FloatRange(min=0), default=0.15, show_default=True,
              help="SmoothGrad noise std as a fraction of the image's value range")
@click.option("--rank-path-rule", type=click.Choice(sorted(RULES)), default="left", show_default=True)
@click.option("--rank-path-steps", type=click.IntRange(min=1), default=1, show_default=True,
              help="quadrature steps per rank segment (left/1 is SPEC's sum)")
@click.option("--seed", type=int, default=0, show_default=True, help="SmoothGrad noise and randomization test")
@click.option("--clip", type=float, default=99.0, show_default=True, help="colour scale percentile of |map|")
@device_option
@svd_backend_option
@click.option("--check", is_flag=True, help="also run the randomization test and report rank-path deltas")
@click.option("--randomization", type=click.Choice(sorted(RANDOMIZATIONS)), default="cascade", show_default=True,
              help="cascade: re-initialize from the top layer down, cumulatively; all: everything at once")
@trust_option
@quiet_option
@friendly_errors
def command(checkpoints, root, dataset, split, verify_shards, keys, index, images, out, trust_checkpoint, quiet,
            **opts):
    """Rank Integrated Gradients (paper Eq. 3) and baseline saliency maps for CHECKPOINTS.

    Example: rankshard-evaluate rig natural.pt robust.pt --data shards --index 0:8 --methods
    vanilla,rig,ig,smoothgrad --check --out rig
    """
    cfg = RunConfig(_map_config(opts), out, opts["clip"], opts["device"], opts["svd_backend"], trust_checkpoint,
                    opts["check"], opts["randomization"], opts["seed"], quiet)
    loaded = load_checkpoints(list(checkpoints), resolve_device(opts["device"]), trust=trust_checkpoint)
    size = common_input_size(loaded, "explain them in separate runs") if images else loaded[0].input_size
    batch, source = _inputs(root, dataset, split, keys, index, images, size or 224, verify_shards)
    check_input_size(loaded, batch.images)
    summary = run_rig(loaded, batch, cfg, source)
    _report(summary)
    click.echo(f"result: {summary['path']}")
    if opts["check"]:
        click.echo(json.dumps({ck["name"]: ck["check"] for ck in summary["checkpoints"]}))
