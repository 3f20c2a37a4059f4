"""The typed configuration of a materialization and the on-disk layout it produces."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rankshard.preprocess.errors import RankshardError
from rankshard.preprocess.format.variants import ENCODINGS, Variant, variants_for

FORMAT = "rankshard/1"
# Fields that do not change a single output byte: they stay out of the config hash.
_NOT_HASHED = ("workers", "batch_size")


@dataclass(frozen=True)
class ShardSpec:
    """Everything that determines the shards of one split of one dataset."""

    dataset: str
    split: str
    ranks: tuple[int, ...] = (5, 10, 20)
    high: tuple[int, ...] = ()
    encoding: str = "png"
    png_level: int = 1            # zlib level: 1 encodes ~3x faster than PIL's default 6 for ~10% more bytes
    factors: int | None = None
    spectra: bool = True
    seed: int = 0
    shuffle: bool = True          # seeded permutation of the source order (training splits)
    shard_size: int = 1000        # samples per shard
    backend: str = "auto"         # resolved to a concrete SVD backend before any shard is written
    device: str = "cpu"
    batch_size: int = 1000        # images per SVD call
    workers: int = 2              # worker processes (preprocess.pipeline says what each does); 0: all in this process
    lowpass: tuple[int, ...] = ()   # k x k lowest 2-D DFT frequencies kept per channel (lowpass-k)
    highpass: tuple[int, ...] = ()  # ... and removed (highpass-k = x - lowpass-k)

    def __post_init__(self):
        if self.encoding not in ENCODINGS:
            raise RankshardError(f"--encoding {self.encoding!r}: choose one of {', '.join(ENCODINGS)}")
        for flag, ks in (("--ranks", self.ranks), ("--high", self.high), ("--lowpass", self.lowpass),
                         ("--highpass", self.highpass)):
            _check_rank_list(flag, ks)
        if self.factors is not None and self.factors < 1:
            raise RankshardError(f"--factors {self.factors}: must be at least 1")
        if self.shard_size < 1 or self.batch_size < 1:
            raise RankshardError("--shard-size and --batch-size must be positive")
        if not 0 <= self.png_level <= 9:
            raise RankshardError(f"--png-level {self.png_level}: zlib levels run from 0 to 9")
        if self.workers < 0:
            raise RankshardError("--workers must be 0 (in-process) or more")

    def check_image_size(self, height: int, width: int) -> None:
        """Refuse ranks that the images cannot have. With ``n = min(H, W)`` singular values per channel, low
        rank ``k >= n`` is a copy of ``full``, high rank ``k >= n`` is all zeros and ``factors`` cannot hold
        more than ``n`` components; a ``k x k`` frequency window with ``k >= max(H, W)`` keeps (low-pass) or
        removes (high-pass) every frequency."""
        n, m = min(height, width), max(height, width)
        limits = {"--ranks": (n, "a copy of full"), "--high": (n, "all zeros"),
                  "--factors": (n + 1, "more components than exist"), "--lowpass": (m, "a copy of full"),
                  "--highpass": (m, "all zeros")}
        lists = {"--ranks": self.ranks, "--high": self.high, "--factors": (self.factors or 0,),
                 "--lowpass": self.lowpass, "--highpass": self.highpass}
        for flag, ks in lists.items():
            limit, result = limits[flag]
            too_big = [k for k in ks if k >= limit]
            if too_big:
                raise RankshardError(f"{flag} {','.join(map(str, too_big))}: on these {height}x{width} images "
                                     f"{too_big[0]} would store {result}; use values below {limit}")

    def variants(self) -> list[Variant]:
        return variants_for(self.ranks, self.high, self.factors, self.spectra, self.encoding, self.lowpass,
                            self.highpass)

    def hashed_config(self, source: dict) -> dict:
        """The resolved config that identifies the output bytes, with the source's fingerprint."""
        cfg = {k: v for k, v in asdict(self).items() if k not in _NOT_HASHED}
        cfg["ranks"], cfg["high"] = sorted(set(self.ranks)), sorted(set(self.high))
        for key in ("lowpass", "highpass"):
            # absent when unused, so configs (and manifests) made before frequency variants keep their hash
            cfg[key] = sorted(set(getattr(self, key)))
            if not cfg[key]:
                del cfg[key]
        cfg["source_fingerprint"] = source["fingerprint"]
        if "geometry" in source:  # image sources: resize/crop and the size rules
            cfg["geometry"] = source["geometry"]
        cfg["format"] = FORMAT
        return cfg


# Why 0 is refused, per list: ranks count singular values kept (low) or removed (high); frequency windows are
# k x k blocks of the 2-D DFT kept (low-pass) or removed (high-pass).
ZERO_MEANS = {
    "--ranks": ("ranks", "low rank 0 is an all-zero image"),
    "--high": ("ranks", "high rank 0 is the full image, which the `full` variant already stores"),
    "--lowpass": ("windows", "a 0 x 0 low-pass window keeps no frequency: an all-zero image"),
    "--highpass": ("windows", "a 0 x 0 high-pass window removes nothing: the full image, which `full` stores"),
}


def _check_rank_list(flag: str, ks: tuple[int, ...]) -> None:
    """Each k at least 1 (``ZERO_MEANS`` says why), each given once."""
    what, zero = ZERO_MEANS[flag]
    bad = [k for k in ks if k < 1]
    if bad:
        raise RankshardError(f"{flag} {bad[0]}: {what} start at 1 ({zero})")
    repeated = sorted({k for k in ks if ks.count(k) > 1})
    if repeated:
        raise RankshardError(f"{flag}: {what[:-1]} {repeated[0]} is listed twice; give each once")


def config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Layout:
    """Paths of one split's output: ``<out>/<dataset>/<split>/<variant>/<split>-%06d.tar``."""

    out: Path
    dataset: str
    split: str
    variants: tuple[Variant, ...] = field(default=())

    @property
    def split_dir(self) -> Path:
        return self.out / self.dataset / self.split

    def variant_dir(self, variant: Variant) -> Path:
        return self.split_dir / variant.name

    def shard_name(self, index: int) -> str:
        return f"{self.split}-{index:06d}.tar"

    def partial_index(self, name: str) -> int | None:
        """The shard index in a temporary file's name (``.train-000014.tar.partial``, an upload's
        ``.train-000014.tar.<pid>-<id>.partial``, its record's ``.train-000014.tar.json...``); None for others."""
        index = name[len(self.split) + 2:].split(".")[0] if name.startswith(f".{self.split}-") else ""
        return int(index) if index.isdigit() else None

    def shard_path(self, variant: Variant, index: int) -> Path:
        return self.variant_dir(variant) / self.shard_name(index)

    def record_path(self, variant: Variant, index: int) -> Path:
        """Sidecar written after a shard is renamed into place; the manifest is assembled from these."""
        return self.variant_dir(variant) / ".progress" / f"{self.shard_name(index)}.json"

    @property
    def config_path(self) -> Path:
        return self.split_dir / ".rankshard-config.json"

    @property
    def lock_path(self) -> Path:
        return self.split_dir / ".lock"
