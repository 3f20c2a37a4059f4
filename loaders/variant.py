"""Resolve a materialized variant by its manifest: shard list, sample counts, classes, normalization.

A loader never trusts a folder listing: the manifest names the shards and their sizes, and a variant
whose files do not match it is refused before any worker starts (a half-written or hand-edited folder
would otherwise show up as a hang or a silently short epoch).
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from braceexpand import braceexpand

from rankshard.preprocess.format.tar import sha256_file

from rankshard.loaders.errors import LoaderError
from rankshard.loaders.normalization import normalization_for

FORMAT = "rankshard/1"
IMAGE_ENCODINGS = ("png", "npy", "factors")
REBUILD = "rerun the same `rankshard-preprocess` command (it resumes and rewrites missing shards)"
HASH_THREADS = min(8, os.cpu_count() or 1)  # hashlib releases the GIL: threads hash shards in parallel


@dataclass(frozen=True)
class VariantInfo:
    """One variant folder as the loaders see it. ``urls`` are local shard paths in manifest order."""

    folder: Path
    urls: list[str]
    shard_sizes: list[int]          # samples per shard, aligned with urls
    num_samples: int
    classes: list[str]
    num_classes: int
    image_size: tuple[int, int]     # stored (h, w): rank is defined at this resolution
    encoding: str                   # png | npy | factors
    mode: str                       # full | low | high | factors
    rank: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    manifest: dict
    bad_shards: dict[str, str] = field(default_factory=dict)  # url -> why it was rejected (on_error="skip")

    @property
    def name(self) -> str:
        return self.manifest["variant"]

    @property
    def dataset(self) -> str:
        return self.manifest["dataset"]

    @property
    def split(self) -> str:
        return self.manifest["split"]


def _expand(spec: str | Sequence[str]) -> list[str]:
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    out = [u for s in specs for u in braceexpand(str(s))]
    remote = [u for u in out if "://" in u or u.startswith("pipe:")]
    if remote:
        raise LoaderError(f"{remote[0]}: only local shard files are supported (the loaders seek inside tars); "
                          "copy or mount the shards locally")
    return out


def _read_manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    if not path.exists():
        raise LoaderError(f"{folder}: no manifest.json, so this is not a finished rankshard variant folder "
                          f"(or its materialization was interrupted); {REBUILD}, or point open_variant at "
                          "<root>/<dataset>/<split>/<variant>")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LoaderError(f"{path}: unreadable ({exc}); delete it and {REBUILD}") from exc
    if manifest.get("format") != FORMAT:
        raise LoaderError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}; rewrite the shards "
                          "with this version of rankshard-preprocess")
    if manifest.get("encoding") not in IMAGE_ENCODINGS:
        raise LoaderError(f"{folder}: variant {manifest.get('variant')!r} holds no images "
                          f"(encoding {manifest.get('encoding')!r}); open a full, rank-, high- or factors- variant")
    return manifest


def _check_files(folder: Path, manifest: dict, selected: list[dict]) -> None:
    listed = {s["name"] for s in manifest["shards"]}
    extra = sorted(p.name for p in folder.glob("*.tar") if p.name not in listed)
    if extra:
        raise LoaderError(f"{folder / extra[0]}: a shard not listed in manifest.json (the folder mixes "
                          f"materializations); remove {len(extra)} unlisted shard(s) or {REBUILD} with --overwrite")
    for shard in selected:
        path = folder / shard["name"]
        if not path.exists():
            raise LoaderError(f"{path}: listed in manifest.json but missing; {REBUILD}")
        size = path.stat().st_size
        if size != shard["bytes"]:
            raise LoaderError(f"{path}: {size} bytes, manifest.json says {shard['bytes']} (truncated or replaced); "
                              f"delete it and {REBUILD}")


_HASHED: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, once per process


def _sha256_once(path: Path) -> str:
    """The file's sha256, computed at most once per process while its size and mtime stay the same (a
    trainer reopens its test variants every epoch; rewriting a shard changes its mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = sha256_file(path)
    return _HASHED[key]


def _verify_shards(folder: Path, selected: list[dict], on_error: str) -> dict[str, str]:
    """Check every selected shard's sha256 against manifest.json. A mismatch raises, naming the shard, or
    (``on_error="skip"``) is returned as ``{url: reason}`` so that its samples are skipped and counted."""
    with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
        digests = list(pool.map(lambda s: _sha256_once(folder / s["name"]), selected))
    bad = {}
    for shard, digest in zip(selected, digests):
        if digest == shard["sha256"]:
            continue
        reason = (f"sha256 {digest[:16]}... differs from manifest.json's {str(shard['sha256'])[:16]}... (the shard "
                  "or the manifest changed after materialization)")
        if on_error == "raise":
            raise LoaderError(f"{folder / shard['name']}: {reason}; `rankshard-preprocess verify` lists every damaged "
                              f"file; delete them and {REBUILD} (or pass on_error='skip' / --no-verify-shards)")
        bad[str(folder / shard["name"])] = reason
    return bad


def _locate(root, dataset, split, variant) -> tuple[Path, list[str] | None]:
    """The variant folder, and the selected shard names when ``root`` was a URL pattern or list."""
    if not isinstance(root, (str, os.PathLike)) or str(root).endswith(".tar") or "{" in str(root):
        urls = _expand(root)
        folders = {Path(u).resolve().parent for u in urls}
        if len(folders) != 1:
            raise LoaderError(f"shard URLs span {len(folders)} folders; open one variant folder at a time "
                              "(join_variants combines variants)")
        return folders.pop(), [Path(u).name for u in urls]
    folder = Path(root).joinpath(*[p for p in (dataset, split, variant) if p])
    return folder, None


def open_variant(root, dataset: str | None = None, split: str | None = None, variant: str | None = None,
                 verify_shards: bool = True, on_error: str = "raise") -> VariantInfo:
    """Open ``<root>/<dataset>/<split>/<variant>`` (or a variant folder, or a brace-expanded shard URL/list).

    Checks that every selected shard exists with the size its manifest records and (``verify_shards``, the
    default) that its sha256 matches, once per process: a flipped byte anywhere is caught before training
    on it. Raises ``LoaderError`` naming the file and the fix; with ``on_error="skip"`` a shard whose hash
    differs is kept in ``bad_shards`` and the loaders skip and count its samples instead.
    """
    folder, names = _locate(root, dataset, split, variant)
    manifest = _read_manifest(folder)
    by_name = {s["name"]: s for s in manifest["shards"]}
    if names is None:
        selected = list(manifest["shards"])
    else:
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise LoaderError(f"{folder / unknown[0]}: not a shard of this variant's manifest.json; check the URL "
                              f"pattern (the manifest lists {manifest['shards'][0]['name']} ...)")
        selected = [by_name[n] for n in names]
    _check_files(folder, manifest, selected)
    bad = _verify_shards(folder, selected, on_error) if verify_shards else {}
    mean, std = normalization_for(manifest["dataset"])
    sizes = [int(s["num_samples"]) for s in selected]
    if names is None and sum(sizes) != manifest["num_samples"]:
        raise LoaderError(f"{folder}/manifest.json: shard sample counts sum to {sum(sizes)}, not num_samples "
                          f"{manifest['num_samples']}; {REBUILD} with --overwrite")
    return VariantInfo(
        folder=folder, urls=[str(folder / s["name"]) for s in selected], shard_sizes=sizes,
        num_samples=sum(sizes), classes=list(manifest["classes"]), num_classes=len(manifest["classes"]),
        image_size=tuple(manifest["image_size"]), encoding=manifest["encoding"], mode=manifest["mode"],
        rank=manifest["rank"], mean=mean, std=std, manifest=manifest, bad_shards=bad,
    )
