"""``rankshard-preprocess imagenet | folder | wds``: image datasets into rank-k shards (torchrun-aware)."""
from __future__ import annotations

from pathlib import Path

import click

from rankshard.preprocess.cli import _sized, default_workers, friendly_errors, shard_options

# Sized for 224 x 224: a shard job carries ~150 KB per image per variant to its writer, so 500 images x
# (full + 4 ranks) is ~375 MB per job in flight; a 250-image SVD batch needs ~1 GB of float32 outputs.
IMAGE_SIZES = {"shard_size": 500, "batch_size": 250}


def image_options(fn):
    """Options shared by the image-dataset commands (on top of ``shard_options``)."""
    options = [
        click.option("--resize", type=int, default=None,
                     help="Shorter side after the (antialiased) resize; default 256 for val/test, 224 for train."),
        click.option("--crop", type=int, default=None, help="Center crop size (default 224)."),
        click.option("--strict", is_flag=True,
                     help="Stop at the first unreadable input instead of skipping it and recording it in the "
                          "manifest's errors."),
        click.option("--shuffle/--no-shuffle", default=None,
                     help="Seeded global shuffle of the sample order (default: on for train, off otherwise)."),
        click.option("--max-pixels", type=int, default=None,
                     help="Refuse images declaring more pixels (decompression bombs); default 89,478,485."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _run(make_source, dataset: str, split: str, out: Path, resize, crop, max_pixels, strict, shuffle, quiet,
         workers, device, overwrite, options: dict) -> None:
    from rankshard.preprocess.imagejob import Placement, cache_dir, default_geometry, run_image_job
    from rankshard.preprocess.report import print_summary
    from rankshard.preprocess.spec import ShardSpec

    placement = Placement.from_env()
    geometry = default_geometry(split, resize, crop, max_pixels)
    source = make_source(geometry, cache_dir(out, dataset, split))
    spec = ShardSpec(dataset=dataset, split=split, shuffle=(split == "train") if shuffle is None else shuffle,
                     device=placement.device(device), workers=default_workers() if workers is None else workers,
                     **_sized(options, **IMAGE_SIZES))
    result = run_image_job(source, spec, out, overwrite, strict, placement, show_progress=not quiet)
    print_summary(result)


@click.command("imagenet")
@click.option("--source", type=click.Path(exists=True, path_type=Path), required=True,
              help="ImageNet root (holding train/, val/ or the ILSVRC2012 tars), a split folder, or an archive.")
@click.option("--split", type=click.Choice(["train", "val"]), required=True)
@click.option("--devkit", type=click.Path(exists=True, path_type=Path), default=None,
              help="Folder holding the devkit (tar.gz, folder, or meta.mat + ground truth) or Kaggle's LOC_*.")
@click.option("--verify-md5", is_flag=True, help="Check the archives against their published md5 (cached).")
@image_options
@shard_options
@friendly_errors
def imagenet_command(source, split, devkit, verify_md5, out, resize, crop, max_pixels, strict, shuffle, quiet,
                     workers, device, overwrite, **options):
    """ILSVRC2012 (ImageNet-1k) train or val into rank-k shards; run under torchrun to scale out."""
    from rankshard.preprocess.imagejob import imagenet_source

    make = lambda g, c: imagenet_source(source, split, g, c, devkit, verify_md5)  # noqa: E731
    _run(make, "imagenet", split, out, resize, crop, max_pixels, strict, shuffle, quiet, workers, device,
         overwrite, options)


@click.command("folder")
@click.option("--source", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Root of a ROOT/<class>/<image> tree (ImageFolder convention; classes in sorted order).")
@click.option("--name", default=None, help="Dataset name in the output path (default: the folder's name).")
@click.option("--split", default="train", show_default=True, help="Split name in the output path.")
@image_options
@shard_options
@friendly_errors
def folder_command(source, name, split, out, resize, crop, max_pixels, strict, shuffle, quiet, workers, device,
                   overwrite, **options):
    """Any image-folder dataset into rank-k shards."""
    from rankshard.preprocess.imagejob import folder_source

    make = lambda g, c: folder_source(source, g, c)  # noqa: E731
    _run(make, name or source.resolve().name, split, out, resize, crop, max_pixels, strict, shuffle, quiet,
         workers, device, overwrite, options)


@click.command("wds")
@click.option("--source", required=True,
              help="Shard paths, brace-expanded: 'shards-{000000..000099}.tar' (join several with '::').")
@click.option("--name", default="wds", show_default=True, help="Dataset name in the output path.")
@click.option("--split", default="train", show_default=True, help="Split name in the output path.")
@image_options
@shard_options
@friendly_errors
def wds_command(source, name, split, out, resize, crop, max_pixels, strict, shuffle, quiet, workers, device,
                overwrite, **options):
    """Existing WebDataset shards (jpg/png/webp + cls) into rank-k shards."""
    from rankshard.preprocess.imagejob import wds_source

    make = lambda g, c: wds_source(source, g, c)  # noqa: E731
    _run(make, name, split, out, resize, crop, max_pixels, strict, shuffle, quiet, workers, device, overwrite,
         options)
