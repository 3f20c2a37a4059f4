"""``rankshard-preprocess``: materialize rank-k datasets into WebDataset shards, verify, preview, demo."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from rankshard.preprocess.errors import friendly_errors


def _int_list(ctx, param, value: str | None) -> tuple[int, ...]:
    if not value:
        return ()
    try:
        return tuple(int(v) for v in value.replace(" ", "").split(",") if v)
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated integers such as 5,10,20") from None


def default_workers() -> int:
    # one core stays with the main process, which runs the SVD
    return max(1, (os.cpu_count() or 2) - 1)


def shard_options(fn):
    """Options shared by every materialization command."""
    options = [
        click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
                     help="Output root; shards go to OUT/<dataset>/<split>/<variant>/."),
        click.option("--ranks", callback=_int_list, default="5,10,20", show_default=True,
                     help="Low ranks k: keep the k largest singular values per channel."),
        click.option("--high", callback=_int_list, default="", help="High ranks k: remove the k largest (x - x_k)."),
        click.option("--encoding", type=click.Choice(["png", "npy"]), default="png", show_default=True,
                     help="png: uint8, lossless after rounding; npy: float16, no clipping."),
        click.option("--png-level", type=click.IntRange(0, 9), default=1, show_default=True,
                     help="zlib level of PNG members (1 is ~3x faster than 6 for ~5-10% more bytes)."),
        click.option("--factors", type=int, default=None, help="Also store the top-K SVD factors (factors-K)."),
        click.option("--spectra/--no-spectra", default=True, show_default=True, help="Store singular values."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the training-order shuffle."),
        click.option("--shard-size", type=int, default=None,
                     help="Samples per shard (default: 1000 for cifar10, 500 for image datasets: a 224x224 shard "
                          "job holds ~150 KB per image per variant in memory)."),
        click.option("--backend", default="auto", show_default=True,
                     help="SVD backend: auto, numpy, torch, gram64, cupy, ... (auto = fastest that meets 1e-4); "
                          "'none' disables the SVD (benchmark baseline: outputs are NOT rank-k)."),
        click.option("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when present)."),
        click.option("--batch-size", type=int, default=None,
                     help="Images per SVD call (default: 1000 for cifar10, 250 for image datasets)."),
        click.option("--workers", type=int, default=None, help="Encode/write processes (default: cores - 1; 0: none)."),
        click.option("--overwrite", is_flag=True, help="Replace shards made with a different configuration."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Materialize rank-k (per-channel truncated SVD) datasets into WebDataset shards."""


def _resolve_device(device: str | None) -> str:
    from rankshard.preprocess.devices import resolve_device

    return str(resolve_device(device))


def _sized(options: dict, **defaults) -> dict:
    """Options with per-command defaults filled in where the user gave none."""
    return {**options, **{k: v for k, v in defaults.items() if options.get(k) is None}}


@main.command("cifar10")
@click.option("--source", type=click.Path(path_type=Path), required=True,
              help="cifar-10-python.tar.gz, or the folder holding it or cifar-10-batches-py/.")
@click.option("--download", is_flag=True, help="Fetch the canonical archive into --source's folder first.")
@click.option("--verify-md5/--no-verify-md5", default=True, show_default=True,
              help="Check the published md5 sums of the batches.")
@click.option("--split", "splits", multiple=True, type=click.Choice(["train", "test"]), default=("train", "test"),
              show_default=True)
@shard_options
@friendly_errors
def cifar10_command(source, download, verify_md5, splits, out, workers, device, overwrite, **options):
    """Turn CIFAR-10 (official python version) into rank-k shards, both splits by default."""
    from rankshard.preprocess.sources.cifar import download_cifar10, load_cifar10
    from rankshard.preprocess.pipeline import ArraySource, materialize_split
    from rankshard.preprocess.report import print_summary
    from rankshard.preprocess.spec import ShardSpec

    if download:
        source = download_cifar10(source if source.suffix != ".gz" else source.parent)
    for split in splits:
        data = load_cifar10(source, split, verify_md5=verify_md5)
        info = {"kind": data.kind, "path": str(source), "fingerprint": data.fingerprint,
                "checksum_verified": data.checksum_verified}
        src = ArraySource(data.images, data.labels, data.source_ids, data.classes, info)
        spec = ShardSpec(dataset="cifar10", split=split, shuffle=(split == "train"), device=_resolve_device(device),
                         workers=default_workers() if workers is None else workers,
                         **_sized(options, shard_size=1000, batch_size=1000))
        print_summary(materialize_split(src, spec, out, overwrite=overwrite))


from rankshard.preprocess.cli_images import folder_command, imagenet_command, wds_command  # noqa: E402  (they use main's options)

main.add_command(imagenet_command)
main.add_command(folder_command)
main.add_command(wds_command)


@main.command("verify")
@click.argument("root", type=click.Path(exists=True, path_type=Path))
@click.option("--samples", type=int, default=16, show_default=True,
              help="Images per variant whose ranks are recomputed with the float64 reference.")
@friendly_errors
def verify_command(root, samples):
    """Re-hash shards against their manifests, count and decode samples, recheck ranks. Exit 1 on mismatch."""
    from rankshard.preprocess.verify import print_report, verify_tree

    report = verify_tree(root, reference_samples=samples)
    print_report(report)
    sys.exit(0 if report.ok else 1)


@main.command("preview")
@click.argument("root", type=click.Path(exists=True, path_type=Path))
@click.option("--count", type=int, default=6, show_default=True, help="Images per variant in the grid.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Grid PNG path (default: ROOT/preview.png; the energy plot goes beside it).")
@friendly_errors
def preview_command(root, count, out):
    """Write a PNG grid of the same images across all variants, and mean retained energy vs rank."""
    from rankshard.preprocess.preview import write_previews

    for path in write_previews(root, count=count, out=out):
        click.echo(f"wrote {path}")


@main.command("demo")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("rankshard-demo"),
              show_default=True)
@click.option("--per-class", type=int, default=100, show_default=True, help="Training images per class.")
@click.option("--workers", type=int, default=None)
@friendly_errors
def demo_command(out, per_class, workers):
    """Offline end-to-end run: build a small CIFAR-10-format archive, materialize, verify, preview."""
    from rankshard.preprocess.demo import run_demo

    run_demo(out, per_class=per_class, workers=default_workers() if workers is None else workers)


if __name__ == "__main__":
    main()
