"""Resolve a materialized variant by its manifest: shard list, sample counts, classes, normalization.

A loader never trusts a folder listing: the manifest names the shards and their sizes, and a variant
whose files do not match it is refused before any worker starts (a half-written or hand-edited folder
would otherwise show up as a hang or a silently short epoch).

Variants may live at URLs (``http(s)://``, ``s3://`` and other fsspec protocols, ``pipe:CMD``; see
``preprocess.format.transport``). Their sizes are checked here (HEAD / object info; a ``pipe:`` command
cannot be asked) and their sha256 where the bytes arrive: a worker fetches each remote shard whole and
checks it against the manifest before reading a sample (``shard_checks``), instead of downloading every
shard here once more just to hash it.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from braceexpand import braceexpand

from rankshard.preprocess.format.manifest import manifest_problem
from rankshard.preprocess.format.tar import sha256_file
from rankshard.preprocess.format.transport import (
    MissingError, TransportError, basename, is_url, join, parent, read_text, scheme, transport_for,
)

from rankshard.loaders.errors import LoaderError
from rankshard.loaders.normalization import normalization_for

FORMAT = "rankshard/1"
IMAGE_ENCODINGS = ("png", "npy", "raw", "factors")
REBUILD = "rerun the same `rankshard-preprocess` command (it resumes and rewrites missing shards)"
HASH_THREADS = min(8, os.cpu_count() or 1)  # hashlib releases the GIL: threads hash shards in parallel


@dataclass(frozen=True)
class VariantInfo:
    """One variant folder as the loaders see it. ``urls`` are shard paths or URLs in manifest order."""

    folder: Path | str              # a local folder, or the URL of a remote one
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
    # remote url -> (sha256 or None when not verifying, bytes): checked as the shard is fetched
    shard_checks: dict[str, tuple[str | None, int]] = field(default_factory=dict)

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
    for u in out:
        try:
            transport_for(u)  # an unknown scheme or a missing optional package fails here, naming the URL
        except TransportError as exc:
            raise LoaderError(str(exc)) from None
    return out


def shard_name(url: str) -> str:
    """The shard file name in a path, URL or ``pipe:`` command (its last ``*.tar`` word)."""
    if scheme(url) == "pipe":
        words = [w for w in url[len("pipe:"):].replace("/", " ").split() if w.endswith(".tar")]
        if not words:
            raise LoaderError(f"{url}: a pipe: command must name the shard file (e.g. pipe:curl -s URL/train-000000.tar)")
        return words[-1]
    return basename(url)


def manifest_location(url: str) -> str:
    """Where the manifest of the shard at ``url`` is: beside it (for ``pipe:``, the same command with the
    shard's name replaced by ``manifest.json``)."""
    name = shard_name(url)
    if scheme(url) == "pipe":
        head, _, tail = url.rpartition(name)
        return f"{head}manifest.json{tail}"
    return join(parent(url), "manifest.json") if is_url(url) else str(Path(url).resolve().parent / "manifest.json")


def _manifest_text(location: str) -> str:
    if not is_url(location):
        if not Path(location).exists():
            raise MissingError(location)
        return Path(location).read_text()
    return read_text(location)


def subfolders(folder: Path) -> list[str]:
    """The visible folders in ``folder`` (none where it is not one): what a layout level holds."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if folder.is_dir() else []


def _first_missing(folder: Path, levels: int = 3) -> Path | None:
    """The highest of ``folder`` and its parents up to the dataset level (``levels`` up) that does not exist,
    below one that does; None where ``folder`` exists or nothing above it within those levels does."""
    if folder.exists():
        return None
    for _ in range(levels):
        if folder.parent.is_dir():
            return folder
        folder = folder.parent
    return None


def _read_manifest(folder, location: str | None = None) -> dict:
    location = location or (join(folder, "manifest.json") if is_url(folder) else str(Path(folder) / "manifest.json"))
    try:
        manifest = json.loads(_manifest_text(location))
    except MissingError:
        gone = None if is_url(str(folder)) else _first_missing(Path(folder))
        if gone is not None:  # a misspelt variant, split or dataset: not an interrupted run
            raise LoaderError(f"{gone}: no such folder; {gone.parent} holds {subfolders(gone.parent) or 'nothing'} "
                              "(layout <root>/<dataset>/<split>/<variant>): check the name, or materialize it "
                              "with rankshard-preprocess") from None
        raise LoaderError(f"{folder}: no manifest.json, so this is not a finished rankshard variant folder "
                          f"(or its materialization was interrupted); {REBUILD}, or point open_variant at "
                          "<root>/<dataset>/<split>/<variant>") from None
    except (OSError, TransportError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoaderError(f"{location}: unreadable ({exc}); delete it and {REBUILD}") from exc
    if isinstance(manifest, dict) and manifest.get("format") != FORMAT:
        raise LoaderError(f"{location}: format {manifest.get('format')!r}, expected {FORMAT!r}; rewrite the shards "
                          "with this version of rankshard-preprocess")
    problem = manifest_problem(location, manifest)
    if problem:
        raise LoaderError(problem)
    if manifest["encoding"] not in IMAGE_ENCODINGS:
        raise LoaderError(f"{folder}: variant {manifest.get('variant')!r} holds no images "
                          f"(encoding {manifest.get('encoding')!r}); open a full, rank-, high-, lowpass-, highpass- or factors- variant")
    return manifest


def _check_remote(folder: str, manifest: dict, urls: dict[str, str]) -> None:
    """Remote shards: none unlisted (where the store can list), each present with the manifest's size."""
    transport = transport_for(next(iter(urls.values())))
    listed = {s["name"] for s in manifest["shards"]}
    if transport.can_list:
        extra = [n for n in transport.names(folder) if n.endswith(".tar") and n not in listed]
        if extra:
            raise LoaderError(f"{join(folder, extra[0])}: a shard not listed in manifest.json (the folder mixes "
                              f"materializations); remove {len(extra)} unlisted shard(s) or {REBUILD} with --overwrite")
    by_name = {s["name"]: s for s in manifest["shards"]}

    def check(item):
        name, url = item
        try:
            size = transport_for(url).size(url, timeout=30)
        except MissingError:
            raise LoaderError(f"{url}: listed in manifest.json but missing; upload it again or {REBUILD}") from None
        except TransportError as exc:
            raise LoaderError(str(exc)) from None
        if size is not None and size != by_name[name]["bytes"]:
            raise LoaderError(f"{url}: {size} bytes, manifest.json says {by_name[name]['bytes']} (truncated or "
                              f"replaced); upload it again or {REBUILD}")

    with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
        list(pool.map(check, urls.items()))


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


def _locate(root, dataset, split, variant) -> tuple[Path | str, str | None, dict[str, str] | None]:
    """The variant folder, its manifest's location (None: in the folder), and ``{name: url}`` of the selected
    shards when ``root`` was a shard URL pattern or list."""
    if not isinstance(root, (str, os.PathLike)) or basename(root).endswith(".tar") or "{" in str(root) \
            or scheme(root) == "pipe":
        urls = _expand(root)
        manifests = {manifest_location(u) for u in urls}
        if len(manifests) != 1:
            raise LoaderError(f"shard URLs span {len(manifests)} folders; open one variant folder at a time "
                              "(join_variants combines variants)")
        location = manifests.pop()
        folder = parent(location) if is_url(location) else Path(location).parent
        return folder, location, {shard_name(u): u if is_url(u) else str(Path(u).resolve()) for u in urls}
    parts = [p for p in (dataset, split, variant) if p]
    if is_url(root):
        return join(str(root), *parts), None, None
    return Path(root).joinpath(*parts), None, None


def open_variant(root, dataset: str | None = None, split: str | None = None, variant: str | None = None,
                 verify_shards: bool = True, on_error: str = "raise") -> VariantInfo:
    """Open ``<root>/<dataset>/<split>/<variant>`` (or a variant folder, or a brace-expanded shard URL/list).

    Checks that every selected shard exists with the size its manifest records and (``verify_shards``, the
    default) that its sha256 matches, once per process: a flipped byte anywhere is caught before training
    on it. Raises ``LoaderError`` naming the file and the fix; with ``on_error="skip"`` a shard whose hash
    differs is kept in ``bad_shards`` and the loaders skip and count its samples instead.
    """
    folder, location, named = _locate(root, dataset, split, variant)
    manifest = _read_manifest(folder, location)
    by_name = {s["name"]: s for s in manifest["shards"]}
    whole = named is None
    if whole:
        selected = list(manifest["shards"])
        named = {s["name"]: join(folder, s["name"]) if is_url(folder) else str(folder / s["name"]) for s in selected}
    else:
        unknown = [n for n in named if n not in by_name]
        if unknown:
            raise LoaderError(f"{named[unknown[0]]}: not a shard of this variant's manifest.json; check the URL "
                              f"pattern (the manifest lists {manifest['shards'][0]['name']} ...)")
        selected = [by_name[n] for n in named]
    urls = [named[s["name"]] for s in selected]
    bad, checks = _check_shards(folder, manifest, selected, named, verify_shards, on_error)
    mean, std = normalization_for(manifest["dataset"])
    sizes = [int(s["num_samples"]) for s in selected]
    if whole and sum(sizes) != manifest["num_samples"]:
        raise LoaderError(f"{folder}/manifest.json: shard sample counts sum to {sum(sizes)}, not num_samples "
                          f"{manifest['num_samples']}; {REBUILD} with --overwrite")
    return VariantInfo(
        folder=folder, urls=urls, shard_sizes=sizes,
        num_samples=sum(sizes), classes=list(manifest["classes"]), num_classes=len(manifest["classes"]),
        image_size=tuple(manifest["image_size"]), encoding=manifest["encoding"], mode=manifest["mode"],
        rank=manifest["rank"], mean=mean, std=std, manifest=manifest, bad_shards=bad, shard_checks=checks,
    )


def _check_shards(folder, manifest: dict, selected: list[dict], named: dict[str, str], verify: bool,
                  on_error: str) -> tuple[dict[str, str], dict[str, tuple[str | None, int]]]:
    """Local shards: sizes, and sha256 now (``bad_shards``). Remote ones: sizes now, and the sha256 to check
    when a worker fetches them (``shard_checks``)."""
    if not is_url(next(iter(named.values()), "")):
        _check_files(Path(folder), manifest, selected)
        return (_verify_shards(Path(folder), selected, on_error) if verify else {}), {}
    _check_remote(str(folder), manifest, named)
    return {}, {named[s["name"]]: (s["sha256"] if verify else None, int(s["bytes"])) for s in selected}
