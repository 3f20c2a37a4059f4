"""A shards tree, read the same way wherever it lies: the one walk behind ``verify``, ``ls`` and ``preview``.

Where the transport lists (a local folder, object storage such as ``s3://`` and other fsspec protocols),
``files_below(ROOT)`` is every file below ROOT with its size: a local folder by its directory tree, object
storage by one recursive listing (no request per folder). Hidden names are included: the ``.progress/``
records and ``.rankshard-config.json`` are what ``ls`` reads. A variant folder is one holding
``manifest.json``; a split folder holds ``.rankshard-config.json`` and the variant folders.

HTTP cannot list, so ROOT must name what to read: ``named_split(URL)`` takes a variant folder (found by its
``manifest.json``; its split is the folder above) or a split folder (found by its ``.rankshard-config.json``),
and the split's recorded configuration says which variant folders it makes. Anything else is refused with
the way out.
"""
from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass

from rankshard.preprocess.errors import RankshardError
from rankshard.preprocess.format.manifest import read_json
from rankshard.preprocess.format.transport import (ForbiddenError, MissingError, basename, is_url, join, parent, scheme,
                                                   transport_for)
from rankshard.preprocess.format.variants import recorded_variants

MAX_VARIANTS = 1_000  # what a configuration may name where each is probed by a request (HTTP); real ones: tens
CONFIG_NAME = ".rankshard-config.json"  # a split's configuration and plan, written before its first shard
MANIFEST = "manifest.json"  # a variant's manifest, written last: its presence means the variant is complete


def can_list(root) -> bool:
    """Whether the folders below ``root`` can be listed (a local folder, object storage; not HTTP)."""
    return not is_url(root) or transport_for(str(root)).can_list


# What a shards tree is made of: shards, manifests/config/records, files being written. Nothing else is listed
# with its size, so a tree that also holds a raw dataset (a million JPEGs) costs no stat per image.
TREE_SUFFIXES = (".tar", ".json", ".partial")


def files_below(root) -> dict[str, int]:
    """Every shards-tree file below ``root`` (a folder, or a URL that ``can_list``) as ``{relative path: bytes}``."""
    return transport_for(str(root)).find(str(root), TREE_SUFFIXES)


def folders_holding(files: dict[str, int], name: str) -> list[str]:
    """The relative folders (``""`` is ROOT itself) holding a file called ``name``, sorted."""
    return sorted({posixpath.dirname(f) for f in files if posixpath.basename(f) == name})


def within(files: dict[str, int], folder: str) -> dict[str, int]:
    """The files below the relative ``folder``, relative to it."""
    if not folder:
        return dict(files)
    prefix = folder.rstrip("/") + "/"
    return {f[len(prefix):]: size for f, size in files.items() if f.startswith(prefix)}


def above(root: str) -> str:
    """The folder holding ``root`` (a local path made absolute first: the parent of ``.`` is not ``.``)."""
    return parent(root) if is_url(root) else os.path.dirname(os.path.abspath(root))


def split_tree(root: str) -> tuple[str, dict[str, int]]:
    """``(root, files_below(root))`` for a listable ``root``; where ``root`` is itself a variant folder (finished
    or not), its split folder and the files below that instead: ``ls`` and ``preview`` show whole splits."""
    files = files_below(root)
    if not _is_variant_folder(root, files):
        return root, files
    split = above(root)
    return split, files_below(split)


def _is_variant_folder(root: str, files: dict[str, int]) -> bool:
    # finished: our manifest (not another tool's manifest.json); unfinished: our per-shard records
    if MANIFEST in files:
        return is_ours(read_json, join(root, MANIFEST))
    return any(f.startswith(".progress/") and f.endswith(".tar.json") for f in files)


def is_ours(read, manifest: str) -> bool:
    """Whether ``manifest`` (a path or URL, read with ``read``) is a rankshard variant's: other tools name
    files manifest.json too, and a data root may hold theirs beside ours."""
    try:
        return written_by_us(read(manifest))
    except RankshardError:
        return False


def written_by_us(data) -> bool:
    """Whether parsed JSON (a manifest or a split's configuration) carries rankshard's format tag."""
    return isinstance(data, dict) and str(data.get("format", "")).startswith("rankshard/")


def read_if_there(url: str, refused: list[str] | None = None) -> dict | None:
    """A remote JSON file, or None where there is none (or the server will not say: some answer 403 for a file
    that is not there, or for every hidden file; those URLs are added to ``refused``)."""
    try:
        return read_json(url)
    except MissingError:
        return None
    except ForbiddenError:
        if refused is not None:
            refused.append(url)
        return None


@dataclass(frozen=True)
class NamedSplit:
    """The split a URL names where nothing can be listed (HTTP)."""

    url: str  # the split folder
    variant: str | None  # the variant folder the URL named; None where it named the split
    recorded: dict  # the split's .rankshard-config.json, else the named variant's manifest (same config entries)

    def variants(self) -> list[str]:
        """The variant folders the split's configuration makes (each one request to look at: bounded)."""
        config = self.recorded.get("config") if isinstance(self.recorded, dict) else None
        try:
            names = recorded_variants(config)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise RankshardError(f"{self.url}: its {CONFIG_NAME} or manifest.json holds no readable rankshard "
                                 f"config ({type(exc).__name__}: {exc}); name a folder that rankshard-preprocess "
                                 "wrote") from None
        if len(names) > MAX_VARIANTS:
            raise RankshardError(f"{self.url}: its configuration names {len(names):,} variants (more than "
                                 f"{MAX_VARIANTS:,}: not one rankshard-preprocess writes); check the file")
        return names

    def manifests(self) -> dict[str, dict | None]:
        """Each variant's manifest, None where it has none (yet): reading one is the only way to see it."""
        return {name: read_if_there(join(self.url, name, MANIFEST)) for name in self.variants()}


def named_split(url: str) -> NamedSplit:
    """The split that ``url`` (a variant folder, finished or not, or a split folder) names; a RankshardError
    saying what to pass where it names neither. Every file probed is optional: a server that hides dotfiles
    still serves a finished variant by its manifest."""
    refused: list[str] = []
    manifest = read_if_there(join(url, MANIFEST), refused)
    if written_by_us(manifest):  # a finished variant
        return NamedSplit(parent(url), basename(url), read_if_there(join(parent(url), CONFIG_NAME)) or manifest)
    config = read_if_there(join(url, CONFIG_NAME), refused)
    if config is not None:  # a split
        return NamedSplit(url, None, config)
    up = join(parent(url), CONFIG_NAME)
    config = read_if_there(up, refused) if is_url(parent(url)) else None  # never above the host
    if config is not None and basename(url) in NamedSplit(parent(url), None, config).variants():
        return NamedSplit(parent(url), basename(url), config)  # an unfinished variant of that split
    # a 403 may mean "not there" (which is why it is read as absent) or a missing or expired token: say which
    forbidden = (f"; the server refused {refused[0]}" + (f" and {len(refused) - 1} more" if len(refused) > 1 else "")
                 + " (HTTP 401/403): if the URL needs a token or credentials, check them") if refused else ""
    raise RankshardError(f"{url}: no rankshard manifest.json or {CONFIG_NAME} there, and {scheme(url)}:// cannot "
                         "list a folder to find the variants below it; name a variant folder "
                         f"(ROOT/<dataset>/<split>/<variant>) or its split folder (ROOT/<dataset>/<split>){forbidden}")
