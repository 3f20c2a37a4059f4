"""ILSVRC2012 (ImageNet-1k) in the layouts people have, as Listings.

- ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG`` folders (the torchvision ImageFolder layout);
- a flat ``val/`` folder with labels from the devkit (``ILSVRC2012_validation_ground_truth.txt`` + ``meta.mat``,
  loose, in ``ILSVRC2012_devkit_t12/data/`` or inside ``ILSVRC2012_devkit_t12.tar.gz``) or from Kaggle's
  ``LOC_val_solution.csv`` + ``LOC_synset_mapping.txt``;
- the original archives read in place: ``ILSVRC2012_img_train.tar`` (1000 per-class tars inside; an inner
  member's bytes sit at outer offset + inner offset) and ``ILSVRC2012_img_val.tar``.

Class index = position of the wnid in the sorted list of the 1000 wnids (torchvision's convention); the
readable class name is the devkit's / synset mapping's ``words`` when found.
"""
from __future__ import annotations

import csv
import io
import os
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from rankshard.preprocess.errors import SourceError
from rankshard.preprocess.sources.listing import Listing
from rankshard.preprocess.sources.matfile import MAX_INFLATED, read_mat
from rankshard.preprocess.sources.folders import IMG_EXTENSIONS, _listing, class_dirs, file_md5, folder_signature, list_folder, tar_members

TRAIN_TAR, VAL_TAR, DEVKIT_TAR = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"
# Published md5 sums of the official archives (the values torchvision's ImageNet dataset checks).
ARCHIVE_MD5 = {
    TRAIN_TAR: "1d675b47d978889d74fa0da5fadfb00e",
    VAL_TAR: "29b22e2961454d5413ddabcf34fc5622",
    DEVKIT_TAR: "fa75699e90414af021442c21a62c3abf",
}
GROUND_TRUTH, META = "ILSVRC2012_validation_ground_truth.txt", "meta.mat"
KAGGLE_SOLUTION, KAGGLE_SYNSETS = "LOC_val_solution.csv", "LOC_synset_mapping.txt"
KAGGLE_DATA = Path("ILSVRC/Data/CLS-LOC")


@dataclass(frozen=True)
class ValLabels:
    """Flat-val labels: image stem -> wnid, the 1000 wnids, their names, and where they came from."""

    by_stem: dict[str, str]
    wnids: tuple[str, ...]
    names: dict[str, str]
    origin: str
    files: tuple[Path, ...]


# -- label files ---------------------------------------------------------------------------------------


def _devkit_files(folder: Path) -> dict[str, bytes] | None:
    """meta.mat and the ground truth from a devkit folder, its tar.gz, or loose in ``folder``."""
    for data in (folder, folder / "ILSVRC2012_devkit_t12" / "data", folder / "data"):
        if (data / META).is_file() and (data / GROUND_TRUTH).is_file():
            return {"origin": str(data), META: (data / META).read_bytes(),
                    GROUND_TRUTH: (data / GROUND_TRUTH).read_bytes(), "files": (data / META, data / GROUND_TRUTH)}
    archive = folder / DEVKIT_TAR
    if archive.is_file():
        found = {"origin": str(archive), "files": (archive,)}
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for m in tar:
                    if m.isfile() and os.path.basename(m.name) in (META, GROUND_TRUTH):
                        if m.size > MAX_INFLATED:  # before it is read: a gzip bomb is not a label file
                            raise tarfile.TarError(f"member {m.name} declares {m.size:,} bytes")
                        found[os.path.basename(m.name)] = tar.extractfile(m).read()
                while tar.fileobj.read(1 << 20):  # to gzip's end, where it checks its CRC: tar stops at its marker
                    pass
        except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
            raise SourceError(f"{archive}: the archive is truncated or corrupt ({exc}); download "
                              f"{DEVKIT_TAR} again, or extract its data/ folder beside the images") from None
        if META in found and GROUND_TRUTH in found:
            return found
    return None


def devkit_synsets(meta_mat: bytes, what: str = META) -> dict[int, tuple[str, str]]:
    """ILSVRC2012_ID -> (wnid, words) for the 1000 leaf classes of the devkit's ``meta.mat``."""
    synsets = read_mat(meta_mat, what).get("synsets")
    if synsets is None or not synsets.fields or "WNID" not in synsets.fields:
        raise SourceError(f"{what}: no 'synsets' struct with a WNID field; is this the ILSVRC2012 devkit meta.mat?")
    out = {}
    try:
        for rec in synsets.data:
            children = rec.get("num_children")
            if children is not None and children.scalar():
                continue  # an inner node of the hierarchy, not one of the 1000 classes
            wnid, words = rec["WNID"].scalar(), rec["words"].scalar()
            if not isinstance(wnid, str) or not isinstance(words, str):
                raise TypeError("WNID and words must be text")
            out[int(rec["ILSVRC2012_ID"].scalar())] = (wnid, words)
    except (KeyError, AttributeError, TypeError, ValueError, OverflowError) as exc:  # missing, empty, other type
        raise SourceError(f"{what}: a synsets record lacks a usable ILSVRC2012_ID, WNID or words ({type(exc).__name__}: "
                          f"{exc}); is this the ILSVRC2012 devkit meta.mat?") from None
    return out


def _devkit_labels(files: dict) -> ValLabels:
    synsets = devkit_synsets(files[META], f"{files['origin']}/{META}")
    try:  # utf-8-sig: a file re-saved on Windows starts with a BOM, which int() refuses
        ids = [int(token) for token in files[GROUND_TRUTH].decode("utf-8-sig").split()]
    except (UnicodeDecodeError, ValueError):
        raise SourceError(f"{files['origin']}/{GROUND_TRUTH}: expected one integer ILSVRC2012_ID per line (the "
                          "devkit's file); it holds something else. Use the file from the ILSVRC2012 devkit.") from None
    unknown = sorted(set(ids) - set(synsets))
    if unknown:
        raise SourceError(f"{files['origin']}: ground truth uses ILSVRC2012_IDs {unknown[:5]} that meta.mat does "
                          "not list as classes; the devkit files do not belong together")
    by_stem = {f"ILSVRC2012_val_{i + 1:08d}": synsets[sid][0] for i, sid in enumerate(ids)}
    names = dict(synsets.values())
    return ValLabels(by_stem, tuple(sorted(names)), names, "devkit", tuple(files["files"]))


def _kaggle_labels(folder: Path) -> ValLabels | None:
    solution, mapping = folder / KAGGLE_SOLUTION, folder / KAGGLE_SYNSETS
    if not (solution.is_file() and mapping.is_file()):
        return None
    # utf-8-sig throughout: a BOM (a file re-saved by a Windows editor) would otherwise glue itself to the
    # first wnid or to the CSV header; it moved the first class to the end of the sorted wnids
    names = {}
    for number, line in enumerate(_text(mapping).splitlines(), 1):
        if line.strip():
            wnid, _, words = line.strip().partition(" ")
            if not _WNID.fullmatch(wnid):
                raise SourceError(f"{mapping}: line {number} starts with {wnid[:20]!r}, not a wnid; expected "
                                  "'n01440764 tench, Tinca tinca' per line (Kaggle's file)")
            names[wnid] = words
    by_stem = {}
    reader = csv.DictReader(io.StringIO(_text(solution), newline=""))
    try:
        if not {"ImageId", "PredictionString"} <= set(reader.fieldnames or ()):
            raise SourceError(f"{solution}: expected the header 'ImageId,PredictionString' (Kaggle's file), found "
                              f"{reader.fieldnames}")
        for row in reader:
            # PredictionString: "wnid x0 y0 x1 y1 wnid ..." (5 tokens per box); every box of an image has its
            # class, so anything but one known wnid at every box start is a damaged or foreign file
            wnids = set((row["PredictionString"] or "").split()[::5])
            if len(wnids) != 1 or not wnids <= names.keys():
                raise SourceError(f"{solution}: line {reader.line_num} ({row['ImageId']}) has PredictionString "
                                  f"{(row['PredictionString'] or '')[:60]!r}; expected boxes 'wnid x0 y0 x1 y1' of "
                                  f"one wnid listed in {KAGGLE_SYNSETS}. Are the two files from the same download?")
            if not (row["ImageId"] or "").strip():  # a row of one field under a header in the other order
                raise SourceError(f"{solution}: line {reader.line_num} has no ImageId; expected rows "
                                  "'ILSVRC2012_val_00000001,n01751748 ...' (Kaggle's file)")
            by_stem[row["ImageId"].strip()] = wnids.pop()
    except csv.Error as exc:  # a field past csv's limit (131072 characters), a quote left open
        raise SourceError(f"{solution}: line {reader.line_num}: {exc}; expected Kaggle's "
                          "'ImageId,PredictionString' file") from None
    return ValLabels(by_stem, tuple(sorted(names)), names, "kaggle", (solution, mapping))


def _text(path: Path) -> str:
    """A Kaggle label file's text: UTF-8 (a BOM left by a Windows editor is dropped), else a SourceError."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path}: not UTF-8 text ({exc}); use the file from Kaggle's download") from None


def find_val_labels(places: list[Path]) -> ValLabels | None:
    """Validation labels from the first place holding devkit or Kaggle label files."""
    for place in places:
        if not place.is_dir():
            continue
        files = _devkit_files(place)
        if files:
            return _devkit_labels(files)
        kaggle = _kaggle_labels(place)
        if kaggle:
            return kaggle
    return None


def class_names(places: list[Path]) -> tuple[dict[str, str], str | None]:
    """wnid -> words from a devkit or synset mapping near the source, for readable class names."""
    labels = find_val_labels(places)
    return (labels.names, labels.origin) if labels else ({}, None)


# -- layouts -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Found:
    """A detected layout: how to list it, and what identifies its current state (for the cache key)."""

    kind: str
    path: Path
    places: tuple[Path, ...]       # where label / name files are looked for
    archives: tuple[Path, ...]     # files --verify-md5 checks


def _places(path: Path, devkit: Path | None, source: Path) -> tuple[Path, ...]:
    base = path if path.is_dir() else path.parent
    # --devkit may name the devkit archive or a label file itself: its folder holds the labels
    found = [devkit if devkit.is_dir() else devkit.parent] if devkit else []
    # and the folder the user passed; Kaggle keeps LOC_* at its root, 4 levels above ILSVRC/Data/CLS-LOC/val
    root = source if source.is_dir() else source.parent
    return tuple(dict.fromkeys(found + [base, *list(base.parents)[:4], root]))


def detect(source: Path, split: str, devkit: Path | None = None) -> Found:
    """Find the split's images under ``source`` (a dataset root, a split folder, or an archive)."""
    source = Path(source)
    archive = TRAIN_TAR if split == "train" else VAL_TAR
    candidates = [source] if source.is_file() else [source / archive, source / split, source / KAGGLE_DATA / split,
                                                   source]
    for c in candidates:
        if c.is_file() and c.name.endswith(".tar"):
            return Found(f"imagenet-{split}-tar", c, _places(c, devkit, source), (c,))
        if c.is_dir() and c != source or (c == source and _looks_like_split(c)):
            kind = "folder" if _has_class_dirs(c) else "flat"
            return Found(f"imagenet-{split}-{kind}", c, _places(c, devkit, source), ())
    raise SourceError(f"{source}: no ImageNet {split} split found. Expected {archive}, {split}/<wnid>/*.JPEG, "
                      f"a flat {split}/ folder with devkit or Kaggle labels, or {KAGGLE_DATA}/{split}/.")


_WNID = re.compile(r"n\d{8}")


def _has_class_dirs(folder: Path) -> bool:
    return any(e.is_dir() and _WNID.fullmatch(e.name) for e in os.scandir(folder))


def _looks_like_split(folder: Path) -> bool:
    # the extensions the flat listing reads (any case), so a folder it would list is also recognised
    return folder.is_dir() and (_has_class_dirs(folder) or any(
        e.name.lower().endswith(IMG_EXTENSIONS) for e in os.scandir(folder)))


def signature(found: Found) -> dict:
    """What changes when the source changes, cheap to compute (stats, not contents)."""
    p = found.path
    if p.is_file():
        state = [p.stat().st_size, p.stat().st_mtime_ns]
    elif found.kind.endswith("folder"):
        state = folder_signature(p, class_dirs(p))
    else:
        state = [p.stat().st_mtime_ns]
    labels = [(str(f), f.stat().st_mtime_ns) for pl in found.places if pl.is_dir()
              for f in sorted(pl.glob("*")) if f.name in (DEVKIT_TAR, GROUND_TRUTH, META, KAGGLE_SOLUTION,
                                                           KAGGLE_SYNSETS, "ILSVRC2012_devkit_t12")]
    sig = {"kind": found.kind, "path": str(p.resolve()), "state": state, "labels": labels}
    if _is_flat_val(found):
        sig["flat_rules"] = FLAT_RULES  # listings cached before a rule changed are built again
    return sig


# The rules of a flat validation listing (bumped when they change: 2 refuses two files of one validation id);
# in the cache signature of flat-val listings only, so train listings (minutes to rebuild) stay cached.
FLAT_RULES = 2


def _is_flat_val(found: Found) -> bool:
    return found.kind.endswith("-flat") or (found.kind.endswith("-tar") and not found.kind.startswith("imagenet-train"))


def _need_labels(found: Found) -> ValLabels:
    labels = find_val_labels(list(found.places))
    if labels is None:
        raise SourceError(f"{found.path}: the flat validation images need labels. Put {DEVKIT_TAR} (or its "
                          f"extracted data/{META} and data/{GROUND_TRUTH}), or Kaggle's {KAGGLE_SOLUTION} and "
                          f"{KAGGLE_SYNSETS}, next to it, or pass --devkit PATH.")
    return labels


def _flat_rows(names_offsets, labels: ValLabels, what: str) -> list[tuple[int, int, int, int, str]]:
    """Rows for a flat list of (container index, name, offset, size): label via the image's file stem."""
    index = {w: i for i, w in enumerate(labels.wnids)}
    rows, missing, seen = [], [], {}
    for c, name, offset, size in names_offsets:
        stem = Path(name).stem
        if stem not in labels.by_stem:
            missing.append(name)
            continue
        _refuse_second_copy(seen, stem, name, what)
        rows.append((c, offset, size, index[labels.by_stem[stem]], f"val/{Path(name).name}"))
    if missing:
        raise SourceError(f"{what}: {len(missing)} images have no label in the {labels.origin} files "
                          f"(first: {missing[0]}); are the label files for ILSVRC2012 validation?")
    return sorted(rows, key=lambda r: r[4])


def _refuse_second_copy(seen: dict[str, str], stem: str, name: str, what: str) -> None:
    # A label belongs to a validation id, not a file: two files of one id (a JPEG left beside its PNG
    # conversion) would both be kept, and the split would silently count and score that image twice.
    if stem in seen:
        first, second = sorted((seen[stem], name))
        raise SourceError(f"{what}: two images of validation id {stem}: {first} and {second}; keep one of "
                          "them (move the other out of the folder) and run again.")
    seen[stem] = name


def _visible(members: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """Members whose file name is not hidden: tars packed on a Mac carry ``._NAME`` resource forks (and
    ``.DS_Store``), which the folder layouts skip as hidden files too."""
    return [m for m in members if not Path(m[0]).name.startswith(".")]


def _list_train_tar(found: Found) -> Listing:
    names, _ = class_names(list(found.places))
    rows = []
    with open(found.path, "rb") as f:
        inner = sorted(_visible(tar_members(f, what=str(found.path))))
        wnids = [Path(n).name[:-4] for n, _, _ in inner if n.endswith(".tar")]
        for label, (name, offset, size) in enumerate(m for m in inner if m[0].endswith(".tar")):
            for member, moff, msize in sorted(_visible(tar_members(f, offset, size, f"{found.path}:{name}"))):
                rows.append((0, moff, msize, label, f"train/{wnids[label]}/{Path(member).name}"))
    return _listing(found.kind, rows, [str(found.path)], wnids, [names.get(w, w) for w in wnids])


def _list_val_tar(found: Found) -> Listing:
    labels = _need_labels(found)
    with open(found.path, "rb") as f:
        members = [(0, n, o, s) for n, o, s in _visible(tar_members(f, what=str(found.path)))]
    rows = _flat_rows(members, labels, str(found.path))
    return _listing(found.kind, rows, [str(found.path)], labels.wnids, [labels.names[w] for w in labels.wnids],
                    {"labels": labels.origin})


def _list_flat(found: Found) -> Listing:
    labels = _need_labels(found)
    files = sorted(e.name for e in os.scandir(found.path)
                   if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(IMG_EXTENSIONS))
    rows = _flat_rows([(i, n, 0, -1) for i, n in enumerate(files)], labels, str(found.path))
    containers = [str(found.path / n) for n in files]
    return _listing(found.kind, rows, containers, labels.wnids, [labels.names[w] for w in labels.wnids],
                    {"labels": labels.origin})


def _list_folder(found: Found) -> Listing:
    names, origin = class_names(list(found.places))
    split = found.kind.split("-")[1]
    listing = list_folder(found.path, found.kind, names, prefix=f"{split}/")
    listing.extra["class_names_from"] = origin
    return listing


LISTERS = {"tar": lambda f: _list_train_tar(f) if f.kind.startswith("imagenet-train") else _list_val_tar(f),
           "flat": _list_flat, "folder": _list_folder}


def list_imagenet(found: Found) -> Listing:
    """The listing of a detected layout (slow for the full dataset; callers cache it)."""
    return LISTERS[found.kind.rsplit("-", 1)[1]](found)


def verify_archives(found: Found, md5_of=file_md5) -> bool:
    """Check every archive of the layout against its published md5; SourceError on a mismatch."""
    if not found.archives:
        raise SourceError(f"{found.path}: --verify-md5 checks the original archives ({TRAIN_TAR}, {VAL_TAR}); "
                          "extracted folders have no published checksums. Drop --verify-md5.")
    for archive in found.archives:
        expected = ARCHIVE_MD5.get(archive.name)
        if expected is None:
            raise SourceError(f"{archive}: no published md5 for this file name; expected one of {sorted(ARCHIVE_MD5)}")
        actual = md5_of(archive)
        if actual != expected:
            raise SourceError(f"{archive}: md5 {actual}, but the published {archive.name} has {expected}. The copy "
                              "is damaged or incomplete: download it again, or drop --verify-md5 to use it anyway.")
    return True
