"""Click options shared by the ``rankshard-preprocess`` commands (one definition, one help text each).

The command modules (``cli_cifar``, ``cli_images``, ``cli_tools``) import from here and ``cli`` registers
them; nothing imports ``cli`` back, so there is no import cycle between the commands.
"""
from __future__ import annotations

from pathlib import Path

import click

from rankshard.preprocess.configfile import config_option
from rankshard.preprocess.errors import ON_ERROR
from rankshard.preprocess.format.transport import is_url
from rankshard.preprocess.rank import BACKEND_NAMES

# "none" runs everything but the SVD (a benchmark baseline); the rest are the rank engine's backends
BACKEND_CHOICES = ("auto", "none", *BACKEND_NAMES)


def _int_list(ctx, param, value: str | None) -> tuple[int, ...]:
    if not value:
        return ()
    try:
        return tuple(int(v) for v in value.replace(" ", "").split(",") if v)
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated integers such as 5,10,20") from None


def _out_location(ctx, param, value: str) -> Path | str:
    """A local folder as a Path; a URL (s3://...) kept as text, since Path would fold ``//`` into ``/``."""
    return value if is_url(value) else Path(value)


def default_workers() -> int:
    """Worker processes when --workers is not given.

    cores - 1 either way. On CPU each worker makes whole shards (decode, SVD, encode, write) and the main
    process makes them too, as the last core's worker; with a GPU, the main process runs the numeric chain
    on it.
    Each CPU worker holds a batch's arrays: about 6.5 MB per 224x224 image with ranks 30,40,50,100 + full +
    spectra (1.6 GB at the image default --batch-size 250): lower --workers or --batch-size to fit memory.
    """
    from rankshard.preprocess.devices import process_cores

    return max(1, process_cores() - 1)


def sized(options: dict, **defaults) -> dict:
    """Options with per-command defaults filled in where the user gave none."""
    return {**options, **{k: v for k, v in defaults.items() if options.get(k) is None}}


def _apply(fn, options: list):
    for option in reversed(options):
        fn = option(fn)
    return fn


def quiet_flag(help_text: str = "No progress bar (results and errors still print)."):
    """--quiet, the one definition for every rankshard command that shows progress (a bar with rate and ETA,
    or progress lines, on stderr): it silences that and nothing else; ``help_text`` says what a command keeps."""
    return click.option("--quiet", is_flag=True, help=help_text)


quiet_option = quiet_flag()


def shard_options(fn):
    """Options shared by every materialization command."""
    return _apply(fn, [
        config_option,
        click.option("--out", callback=_out_location, required=True,
                     help="Output root (a folder, or object storage such as s3://bucket/prefix); shards go to "
                          "OUT/<dataset>/<split>/<variant>/."),
        click.option("--ranks", callback=_int_list, default="5,10,20", show_default=True,
                     help="Low ranks k: keep the k largest singular values per channel."),
        click.option("--high", callback=_int_list, default="", help="High ranks k: remove the k largest (x - x_k)."),
        click.option("--lowpass", callback=_int_list, default="",
                     help="Low-pass windows k: keep the k x k lowest 2-D DFT frequencies per channel (lowpass-k)."),
        click.option("--highpass", callback=_int_list, default="",
                     help="High-pass windows k: remove the k x k lowest frequencies (highpass-k, npy)."),
        click.option("--encoding", type=click.Choice(["png", "npy", "raw"]), default="png", show_default=True,
                     help="png: uint8, lossless after rounding (the default, ImageNet included: the fewest bytes, "
                          "see the README's encodings table); raw: the same uint8 pixels uncompressed (no encode "
                          "cost, ~8x the loader rate per core, ~2.3x the bytes); npy: float16, no clipping."),
        click.option("--png-level", type=click.IntRange(0, 9), default=1, show_default=True,
                     help="zlib level of PNG members (1 is ~3x faster than 6 for ~5-10% more bytes)."),
        click.option("--factors", type=click.IntRange(min=1), default=None, help="Also store the top-K SVD factors (factors-K)."),
        click.option("--spectra/--no-spectra", default=True, show_default=True, help="Store singular values."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the training-order shuffle."),
        click.option("--shard-size", type=click.IntRange(min=1), default=None,
                     help="Samples per shard (default: 1000 for cifar10, 500 for image datasets: a 224x224 shard "
                          "job holds ~150 KB per image per variant in memory)."),
        click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True,
                     help="SVD backend: auto, numpy, torch, gram64, cupy, ... (auto = fastest that meets 1e-4); "
                          "'none' disables the SVD (benchmark baseline: outputs are NOT rank-k)."),
        click.option("--device", default="auto", show_default=True,
                     help="auto (this process's GPU cuda:LOCAL_RANK when CUDA is present, else cpu), cpu, cuda, "
                          "cuda:1."),
        click.option("--batch-size", type=click.IntRange(min=1), default=None,
                     help="Images per SVD call (default: 1000 for cifar10, 250 for image datasets)."),
        click.option("--workers", type=click.IntRange(min=0), default=None, help="Worker processes (default: cores - 1; the main process makes shards too on CPU; 0: all in this process)."),
        click.option("--overwrite", is_flag=True, help="Replace shards made with a different configuration."),
        click.option("--space-check/--no-space-check", default=True, show_default=True,
                     help="After each shard, stop (keeping every finished shard) if the bytes per image so far "
                          "say the rest will not fit on the output disk."),
        click.option("--estimate", is_flag=True,
                     help="Write no shards: make one SVD batch of images spread over the split (in one process, "
                          "into a temporary folder) and print the bytes per variant and the time the run will take."),
        quiet_option,
    ])


def image_options(fn):
    """Options shared by the image-dataset commands (on top of ``shard_options``)."""
    return _apply(fn, [
        click.option("--resize", type=click.IntRange(min=1), default=None,
                     help="Shorter side after the (antialiased) resize; default 256 for val/test, 224 for train."),
        click.option("--crop", type=click.IntRange(min=1), default=None, help="Center crop size (default 224)."),
        click.option("--on-error", type=click.Choice(ON_ERROR), default=None,
                     help="Unreadable inputs: skip (default) skips each and records it in the manifest's errors; "
                          "raise stops at the first. The loaders' on_error uses the same words."),
        click.option("--strict", is_flag=True, help="Alias of --on-error raise."),
        click.option("--exif-transpose", is_flag=True,
                     help="Rotate/flip photos as their EXIF orientation says (default: ignored, as torchvision's "
                          "ImageFolder does, so shards match what ImageNet models were trained on)."),
        click.option("--shuffle/--no-shuffle", default=None,
                     help="Seeded global shuffle of the sample order (default: on for train, off otherwise)."),
        click.option("--max-pixels", type=click.IntRange(min=1), default=None,
                     help="Refuse images declaring more pixels (decompression bombs); default 89,478,485."),
    ])


def bad_input_policy(on_error: str | None, strict: bool) -> str:
    """The policy from ``--on-error`` and its alias ``--strict`` (which must not contradict each other)."""
    if strict and on_error == "skip":
        raise click.UsageError("--strict means --on-error raise; drop one of --strict and --on-error skip")
    return "raise" if strict else (on_error or "skip")
