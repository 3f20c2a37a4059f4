"""``rankshard-evaluate svd-profile``: influential singular directions per class and their class hypergraph."""
from __future__ import annotations

from pathlib import Path

import click
import torch

from rankshard.train.checkpoint import model_from_checkpoint

from rankshard.evaluate.data import shard_data
from rankshard.evaluate.errors import friendly_errors
from rankshard.evaluate.weights.svd_profile import ProfileConfig, profile_model, summary, write_profile


@click.command("svd-profile")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--data", "root", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Shard root: ROOT/<dataset>/<split>/<variant>/ as written by rankshard-preprocess.")
@click.option("--dataset", default=None, help="Dataset folder under ROOT (default: the only one there).")
@click.option("--split", default="test", show_default=True)
@click.option("--variant", default="full", show_default=True, help="Shard variant the images come from.")
@click.option("--per-class", type=int, default=20, show_default=True, help="Images profiled per class.")
@click.option("--layers", default="*", show_default=True,
              help="Comma-separated fnmatch patterns over Conv2d/Linear names, e.g. 'layer4.*,fc'.")
@click.option("--mass", type=float, default=0.5, show_default=True,
              help="Share of an image's total projection magnitude its influential directions must carry.")
@click.option("--top-k", type=int, default=None, help="Leading singular directions per layer (default: all).")
@click.option("--class-share", type=float, default=0.0, show_default=True,
              help="A direction joins a class's hyperedge when influential for this share of its images (0: union).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default="svd-profile", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:i].")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True, help="Loader worker processes.")
@click.option("--trust-checkpoint", is_flag=True,
              help="Allow full unpickling of checkpoints that weights_only loading refuses (trusted files only).")
@friendly_errors
def command(checkpoint, root, dataset, split, variant, per_class, layers, mass, top_k, class_share, out, device,
            batch_size, workers, trust_checkpoint):
    """DeepDataProfiler-style SVD profile: per class, the singular directions of each layer's unfolded weight
    that carry MASS of the images' projected activations; writes svd-profile.json, hypergraph.json (classes x
    directions incidence), jaccard.json and jaccard.png to OUT."""
    cfg = ProfileConfig(layers=layers, top_k=top_k, mass=mass, class_share=class_share, per_class=per_class)
    data = shard_data(root, dataset, split, variant, batch_size=batch_size, workers=workers)
    model, _payload = model_from_checkpoint(checkpoint, trust=trust_checkpoint)
    model = model.to(device)
    with torch.no_grad():
        profile = profile_model(model, data.batches(0, 1), data.num_classes, cfg, data.classes, device)
    source = {"checkpoint": str(checkpoint), "data": data.name}
    write_profile(profile, cfg, out, source)
    click.echo(f"{summary(profile)}\nwritten to {out}/ (svd-profile.json, hypergraph.json, jaccard.json/png)")
