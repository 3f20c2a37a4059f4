"""``rankshard-preprocess verify | ls | preview | demo``: check, list, look at and try out materialized shards."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from rankshard.preprocess.errors import friendly_errors
from rankshard.preprocess.configfile import config_option
from rankshard.preprocess.options import quiet_option


def _local_or_url(ctx, param, value: str) -> str:
    """A URL as given (checked when read); a local path must exist."""
    from rankshard.preprocess.format.transport import is_url

    if not is_url(value) and not Path(value).exists():
        raise click.BadParameter(f"{value}: no such folder")
    return value


@click.command("verify")
@config_option
@click.argument("root", callback=_local_or_url)
@click.option("--samples", type=int, default=16, show_default=True,
              help="Images per variant whose ranks are recomputed with the float64 reference.")
@quiet_option
@friendly_errors
def verify_command(root, samples, quiet):
    """Re-hash shards against their manifests, count and decode samples, recheck ranks. Exit 1 on mismatch.

    ROOT: a folder, object storage (s3://...), or over HTTP a variant or split folder."""
    from rankshard.preprocess.verify import print_report, verify_tree

    report = verify_tree(root, reference_samples=samples, show_progress=not quiet)
    print_report(report)
    sys.exit(0 if report.ok else 1)


@click.command("ls")
@config_option
@click.argument("root", callback=_local_or_url)
@click.option("--json", "as_json", is_flag=True, help="Print the inventory as JSON (a list, one object per split).")
@friendly_errors
def ls_command(root, as_json):
    """List the splits below ROOT: complete or how far a run got, sizes, configuration, variants.

    ROOT: a folder, object storage (s3://...), or over HTTP a split or variant folder. A variant folder
    lists the split above it. Only a local folder shows whether a run is writing a split now (its lock)."""
    from rankshard.preprocess.inventory import inventory, inventory_json, print_inventory

    splits = inventory(root)
    if as_json:
        click.echo(inventory_json(splits))
    else:
        print_inventory(root, splits)


@click.command("preview")
@config_option
@click.argument("root", callback=_local_or_url)
@click.option("--count", type=int, default=6, show_default=True, help="Images per variant in the grid.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Grid PNG path (default: preview.png in each split's folder; for a URL ROOT, preview.png "
                   "in the current folder). With several splits below ROOT each gets its own file, FILE's "
                   "stem + -<dataset>-<split> (p.png -> p-cifar10-train.png, p-cifar10-test.png), with any "
                   "folders between ROOT and the dataset in front (p-a-cifar10-train.png); the energy plot "
                   "goes beside each grid (<grid stem>-energy.png).")
@quiet_option
@friendly_errors
def preview_command(root, count, out, quiet):
    """Write a PNG grid of the same images across all variants, and mean retained energy vs rank.

    ROOT: a folder, object storage (s3://...), or over HTTP a split or variant folder (a variant folder
    shows the split above it). Remote shards are fetched and checked against their manifest's sha256."""
    from rankshard.preprocess.preview import write_previews

    for path in write_previews(root, count=count, out=out, show_progress=not quiet):
        click.echo(f"wrote {path}")


@click.command("demo")
@config_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("rankshard-demo"),
              show_default=True)
@click.option("--per-class", type=int, default=100, show_default=True, help="Training images per class.")
@click.option("--workers", type=int, default=None, help="Worker processes (default: as cifar10's --workers).")
@quiet_option
@friendly_errors
def demo_command(out, per_class, workers, quiet):
    """Offline end-to-end run: build a small CIFAR-10-format archive, materialize, verify, preview."""
    from rankshard.preprocess.demo import run_demo

    run_demo(out, per_class=per_class, workers=workers, quiet=quiet)
