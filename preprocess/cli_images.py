"""``rankshard-preprocess imagenet | folder | wds``: image datasets into rank-k shards (torchrun-aware)."""
from __future__ import annotations

from pathlib import Path

import click

from rankshard.preprocess.devices import Placement
from rankshard.preprocess.errors import friendly_errors
from rankshard.preprocess.options import bad_input_policy, default_workers, image_options, shard_options, sized

# Sized for 224 x 224: a shard job carries ~150 KB per image per variant to its writer, so 500 images x
# (full + 4 ranks) is ~375 MB per job in flight; a 250-image SVD batch needs ~1 GB of float32 outputs.
IMAGE_SIZES = {"shard_size": 500, "batch_size": 250}


def _run(make_source, dataset: str, split: str, opts: dict) -> None:
    """The shared body of the image commands: ``opts`` are the parsed image and shard options."""
    from rankshard.preprocess.imagejob import cache_dir, default_geometry, run_image_job
    from rankshard.preprocess.report import print_summary
    from rankshard.preprocess.spec import ShardSpec

    placement = Placement.from_env()
    policy = bad_input_policy(opts.pop("on_error"), opts.pop("strict"))
    geometry = default_geometry(split, opts.pop("resize"), opts.pop("crop"), opts.pop("max_pixels"),
                                opts.pop("exif_transpose"))
    out, shuffle, quiet, workers = opts.pop("out"), opts.pop("shuffle"), opts.pop("quiet"), opts.pop("workers")
    device, overwrite, space_check, estimate = (opts.pop(k) for k in ("device", "overwrite", "space_check", "estimate"))
    source = make_source(geometry, cache_dir(out, dataset, split))
    device = str(placement.device(device))
    spec = ShardSpec(dataset=dataset, split=split, shuffle=(split == "train") if shuffle is None else shuffle,
                     device=device, workers=default_workers() if workers is None else workers,
                     **sized(opts, **IMAGE_SIZES))
    if estimate:
        from rankshard.preprocess.estimate import estimate_split, print_estimate
        if placement.rank == 0:  # one measurement speaks for every rank
            print_estimate(estimate_split(source, spec, out, placement.world))
        return
    print_summary(run_image_job(source, spec, out, overwrite, policy, placement, show_progress=not quiet,
                                space_check=space_check))


@click.command("imagenet")
@click.option("--source", type=click.Path(exists=True, path_type=Path), required=True,
              help="ImageNet root (holding train/, val/ or the ILSVRC2012 tars), a split folder, or an archive.")
@click.option("--split", type=click.Choice(["train", "val"]), required=True)
@click.option("--devkit", type=click.Path(exists=True, path_type=Path), default=None,
              help="The devkit tar.gz, or a folder holding it (or its data/, or meta.mat + ground truth) or Kaggle's LOC_*.")
@click.option("--verify-md5", is_flag=True, help="Check the archives against their published md5 (cached).")
@image_options
@shard_options
@friendly_errors
def imagenet_command(source, split, devkit, verify_md5, **opts):
    """ILSVRC2012 (ImageNet-1k) train or val into rank-k shards; run under torchrun to scale out."""
    from rankshard.preprocess.imagejob import imagenet_source

    _run(lambda g, c: imagenet_source(source, split, g, c, devkit, verify_md5), "imagenet", split, opts)


@click.command("folder")
@click.option("--source", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Root of a ROOT/<class>/<image> tree (ImageFolder convention; classes in sorted order).")
@click.option("--name", default=None, help="Dataset name in the output path (default: the folder's name).")
@click.option("--split", default="train", show_default=True, help="Split name in the output path.")
@image_options
@shard_options
@friendly_errors
def folder_command(source, name, split, **opts):
    """Any image-folder dataset into rank-k shards."""
    from rankshard.preprocess.imagejob import folder_source

    _run(lambda g, c: folder_source(source, g, c), name or source.resolve().name, split, opts)


@click.command("wds")
@click.option("--source", required=True,
              help="Shard paths, brace-expanded: 'shards-{000000..000099}.tar' (join several with '::').")
@click.option("--name", default="wds", show_default=True, help="Dataset name in the output path.")
@click.option("--split", default="train", show_default=True, help="Split name in the output path.")
@image_options
@shard_options
@friendly_errors
def wds_command(source, name, split, **opts):
    """Existing WebDataset shards (jpg/png/webp + cls) into rank-k shards."""
    from rankshard.preprocess.imagejob import wds_source

    _run(lambda g, c: wds_source(source, g, c), name, split, opts)
