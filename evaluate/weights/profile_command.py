"""``rankshard-evaluate svd-profile``: influential singular directions per class and their class hypergraph."""
from __future__ import annotations

import click
import torch

from rankshard.preprocess.devices import resolve_device
from rankshard.preprocess.progress import Progress

from rankshard.evaluate.checkpoints import load_checkpoints
from rankshard.evaluate.data import shard_data
from rankshard.evaluate.errors import friendly_errors
from rankshard.evaluate.options import (checkpoints_argument, data_root_options, device_option, out_option,
                                        quiet_option, trust_option, workers_option)
from rankshard.evaluate.weights.svd_profile import ProfileConfig, profile_model, summary, write_profile
from rankshard.preprocess.configfile import config_option


@click.command("svd-profile")
@config_option
@checkpoints_argument(single=True)
@data_root_options()
@click.option("--variant", default="full", show_default=True, help="Shard variant the images come from.")
@click.option("--per-class", type=int, default=20, show_default=True, help="Images profiled per class.")
@click.option("--layers", default="*", show_default=True,
              help="Comma-separated fnmatch patterns over Conv2d/Linear names, e.g. 'layer4.*,fc'.")
@click.option("--mass", type=float, default=0.5, show_default=True,
              help="Share of an image's total projection magnitude its influential directions must carry.")
@click.option("--top-k", type=int, default=None, help="Leading singular directions per layer (default: all).")
@click.option("--class-share", type=float, default=0.0, show_default=True,
              help="A direction joins a class's hyperedge when influential for this share of its images (0: union).")
@out_option("svd-profile.json, hypergraph.json, jaccard.json and jaccard.png")
@device_option
@click.option("--batch-size", type=int, default=64, show_default=True)
@workers_option()
@trust_option
@quiet_option
@friendly_errors
def command(checkpoints, root, dataset, split, verify_shards, variant, per_class, layers, mass, top_k, class_share,
            out, device, batch_size, workers, trust_checkpoint, quiet):
    """DeepDataProfiler-style SVD profile: per class, the singular directions of each layer's unfolded weight
    that carry MASS of the images' projected activations; writes svd-profile.json, hypergraph.json (classes x
    directions incidence), jaccard.json and jaccard.png to OUT."""
    cfg = ProfileConfig(layers=layers, top_k=top_k, mass=mass, class_share=class_share, per_class=per_class)
    data = shard_data(root, dataset, split, variant, batch_size=batch_size, workers=workers,
                      verify_shards=verify_shards)
    device = resolve_device(device)
    (ck,) = load_checkpoints([checkpoints], device, trust=trust_checkpoint)
    # the profile stops once every class has --per-class images, so that is the work to do
    bar = Progress(min(data.num_samples, per_class * data.num_classes), "svd-profile", enabled=not quiet)
    with torch.no_grad():
        profile = profile_model(ck.model, data.batches(0, 1), data.num_classes, cfg, data.classes, device, bar.update)
    bar.close()
    source = {"checkpoint": ck.path, "name": ck.name, "data": data.name}
    path = write_profile(profile, cfg, out, source, device)
    click.echo(f"{summary(profile)}\nresult: {path} (+ hypergraph.json, jaccard.json/png)")
