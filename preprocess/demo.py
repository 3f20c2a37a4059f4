"""``rankshard-preprocess demo``: the whole materialization job on embedded, offline data."""
from __future__ import annotations

from pathlib import Path

import click

from rankshard.preprocess.cli_cifar import cifar10_command
from rankshard.preprocess.sources.cifar import ARCHIVE, write_cifar10_archive
from rankshard.preprocess.errors import RankshardError
from rankshard.preprocess.preview import write_previews
from rankshard.preprocess.verify import print_report, verify_tree
from rankshard.preprocess.sources.synth import labelled_images


# A tiny net trains on the demo shards in seconds on a CPU; the same commands scale to the paper's runs.
NEXT_STEPS = """
Next steps on these shards (a tiny ResNet-18: seconds each on a CPU; the AutoAttack sweep a few minutes):
  rankshard-train --preset cifar10-paper --data {shards} --train-variant rank-005 --out {runs}/rank-005 \\
      --arch resnet18 --width 8 --epochs 2 --batch-size 64 --milestones 1 --workers 2
  rankshard-evaluate spectrum {runs}/rank-005/best.pt --data {shards} --split test --ranks all --out {results}/spectrum
  rankshard-evaluate pgd {runs}/rank-005/best.pt --data {shards} --eps 4/255 --steps 20 --targeted --out {results}/pgd
  rankshard-evaluate robustness {runs}/rank-005/best.pt --data {shards} --eps 0,1/255,2/255,4/255,8/255 \\
      --attack pgd,aa --apgd-steps 20 --fab-steps 20 --square-queries 200 --limit 20 --out {results}/robustness
  rankshard-evaluate report {results} --runs {runs}/rank-005 --out {results}/report
"""


def build_demo_archive(folder: Path, per_class: int = 100, test_per_class: int = 20, seed: int = 0) -> Path:
    """A CIFAR-10-python-format archive of synthetic natural-looking images (deterministic)."""
    train = labelled_images(per_class, seed=seed)
    test = labelled_images(test_per_class, seed=seed + 1)
    return write_cifar10_archive(folder / ARCHIVE, train, test)


def run_demo(out: Path, per_class: int = 100, workers: int | None = None, quiet: bool = False) -> None:
    """Build the archive, run the real ``cifar10`` command on it, verify, preview, say where things are."""
    out = Path(out)
    archive = build_demo_archive(out / "source", per_class)
    click.echo(f"demo source: {archive} ({per_class * 10} train + 200 test images, synthetic, not the real "
               "CIFAR-10, so --no-verify-md5)")
    shards = out / "shards"
    args = ["cifar10", "--source", str(archive), "--out", str(shards), "--no-verify-md5", "--ranks", "5,10,20",
            "--high", "2,5", "--factors", "8", "--shard-size", "250"] + ["--workers", str(workers)] * (workers is not None)
    args += ["--quiet"] * quiet
    click.echo(f"\n$ rankshard-preprocess {' '.join(args)}")
    cifar10_command.main(args[1:], "rankshard-preprocess cifar10", standalone_mode=False)
    click.echo(f"\n$ rankshard-preprocess verify {shards}")
    report = verify_tree(shards, show_progress=not quiet)
    print_report(report)
    if not report.ok:
        raise RankshardError("the demo's own shards failed verification; please report this as a bug")
    click.echo(f"\n$ rankshard-preprocess preview {shards}")
    for path in write_previews(shards, show_progress=not quiet):
        click.echo(f"wrote {path}")
    click.echo(f"\nDone. Shards: {shards}/cifar10/<split>/<variant>/ ; previews: {shards}/cifar10/*/preview*.png")
    click.echo(NEXT_STEPS.format(shards=shards, runs=out / "runs", results=out / "results"))
