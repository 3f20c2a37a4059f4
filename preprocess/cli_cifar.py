"""``rankshard-preprocess cifar10``: CIFAR-10 (official python version) into rank-k shards."""
from __future__ import annotations

from pathlib import Path

import click

from rankshard.preprocess.devices import Placement
from rankshard.preprocess.errors import friendly_errors
from rankshard.preprocess.options import default_workers, shard_options, sized


@click.command("cifar10")
@click.option("--source", type=click.Path(path_type=Path), required=True,
              help="cifar-10-python.tar.gz, or the folder holding it or cifar-10-batches-py/.")
@click.option("--download", is_flag=True, help="Fetch the canonical archive into --source's folder first.")
@click.option("--verify-md5/--no-verify-md5", default=True, show_default=True,
              help="Check the published md5 sums of the batches.")
@click.option("--split", "splits", multiple=True, type=click.Choice(["train", "test"]), default=("train", "test"),
              show_default=True)
@shard_options
@friendly_errors
def cifar10_command(source, download, verify_md5, splits, out, workers, device, overwrite, quiet, space_check,
                    estimate, **options):
    """Turn CIFAR-10 (official python version) into rank-k shards, both splits by default."""
    from rankshard.preprocess.sources.cifar import download_cifar10, load_cifar10
    from rankshard.preprocess.pipeline import ArraySource, materialize_split
    from rankshard.preprocess.report import print_summary
    from rankshard.preprocess.spec import ShardSpec

    if download:
        source = download_cifar10(source if source.suffix != ".gz" else source.parent)
    placement = Placement.from_env()  # under torchrun, rank R writes the shards i with i % WORLD_SIZE == R
    resolved = str(placement.device(device))  # "auto" resolved once, for every split
    for split in splits:
        data = load_cifar10(source, split, verify_md5=verify_md5)
        info = {"kind": data.kind, "path": str(source), "fingerprint": data.fingerprint,
                "checksum_verified": data.checksum_verified}
        src = ArraySource(data.images, data.labels, data.source_ids, data.classes, info)
        spec = ShardSpec(dataset="cifar10", split=split, shuffle=(split == "train"), device=resolved,
                         workers=default_workers() if workers is None else workers,
                         **sized(options, shard_size=1000, batch_size=1000))
        if estimate:
            from rankshard.preprocess.estimate import estimate_split, print_estimate
            if placement.rank == 0:  # one measurement speaks for every rank
                print_estimate(estimate_split(src, spec, out, placement.world))
            continue
        print_summary(materialize_split(src, spec, out, overwrite=overwrite, show_progress=not quiet,
                                        rank=placement.rank, world=placement.world, space_check=space_check))
