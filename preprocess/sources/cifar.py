"""CIFAR-10 reader for the official python version, straight from the archive or its extracted folder.

The batches are pickles, and a pickle can run arbitrary code when loaded, so they are read with an
unpickler that only admits the handful of numpy constructors a genuine batch needs.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rankshard.preprocess.errors import SourceError

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE = "cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
# Published md5 sums of the members (the same list torchvision checks).
SPLIT_FILES = {
    "train": (
        ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
        ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
        ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
        ("data_batch_4", "634d18415352ddfa80567beed471001a"),
        ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
    ),
    "test": (("test_batch", "40351d587109b95175f43aff81a1287e"),),
}
META_FILE = ("batches.meta", "5ff9c542aee3614f3951f8cda6e48888")
# Largest member worth reading. A genuine batch pickles 10000 x 3072 bytes of pixels plus labels and
# file names (~31 MB); batches.meta is 158 bytes. Without a cap, a crafted archive (a 2.9 MB gzip bomb)
# made the reader hold 3.2 GB before the md5 check could refuse it.
MAX_BATCH_BYTES = 40_000_000
MAX_META_BYTES = 64 * 1024

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise SourceError(
                f"refusing to unpickle {module}.{name}: a CIFAR-10 batch only holds numpy arrays and lists, "
                "so this file is not a genuine batch (it could run code). Re-download the official archive."
            )
        return super().find_class(module, name)


def safe_unpickle(data: bytes, what: str) -> dict:
    """Load a CIFAR batch pickle without executing anything but numpy array reconstruction."""
    try:
        obj = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except SourceError:
        raise
    except Exception as exc:  # truncated or garbled pickles raise a zoo of exception types
        raise SourceError(f"{what}: not a readable CIFAR-10 batch ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise SourceError(f"{what}: expected a dict, found {type(obj).__name__}")
    # latin-1 reads any bytes: a key that is not ASCII is no key of a batch (and was a UnicodeDecodeError)
    return {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


@dataclass(frozen=True)
class CifarSplit:
    """One split in source order: images uint8 [N, 32, 32, 3], labels int64 [N], provenance ids."""

    images: np.ndarray
    labels: np.ndarray
    source_ids: list[str]
    classes: tuple[str, ...]
    fingerprint: str
    checksum_verified: bool
    kind: str = "cifar10-python"
    extra: dict = field(default_factory=dict)


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


class _Members:
    """Uniform access to batch files in a .tar.gz archive or an extracted folder."""

    def __init__(self, path: Path):
        self.path = path
        self._tar_bytes: dict[str, bytes] | None = None
        if path.is_file():
            self._tar_bytes = self._read_archive(path)
        elif (path / FOLDER).is_dir():
            self.path = path / FOLDER
        elif (path / ARCHIVE).is_file():
            self._tar_bytes = self._read_archive(path / ARCHIVE)
        elif not path.is_dir():
            raise SourceError(
                f"{path}: no CIFAR-10 here. Pass the path of {ARCHIVE} or of its extracted {FOLDER}/ folder, "
                "or add --download to fetch it."
            )

    @staticmethod
    def _read_archive(path: Path) -> dict[str, bytes]:
        wanted = {name for files in SPLIT_FILES.values() for name, _ in files} | {META_FILE[0]}
        found: dict[str, bytes] = {}
        try:
            with tarfile.open(path, "r:*") as tar:
                for member in tar:
                    name = os.path.basename(member.name)
                    if member.isfile() and name in wanted:
                        _check_size(f"{path}: member {member.name}", name, member.size)  # before reading it
                        found[name] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
            raise SourceError(
                f"{path}: the archive is truncated or corrupt ({exc}). Delete it and download it again "
                f"(rankshard-preprocess cifar10 --download, or {URL})."
            ) from exc
        return found

    def read(self, name: str) -> bytes:
        if self._tar_bytes is not None:
            if name not in self._tar_bytes:
                raise SourceError(f"{self.path}: archive has no member {FOLDER}/{name}; is it the CIFAR-10 python version?")
            return self._tar_bytes[name]
        file = self.path / name
        if not file.is_file():
            raise SourceError(f"{file}: missing. Expected the extracted {FOLDER}/ folder of the python version.")
        _check_size(str(file), name, file.stat().st_size)
        return file.read_bytes()


def _check_size(what: str, name: str, size: int) -> None:
    """Refuse a member larger than any genuine CIFAR-10 file of that name, before a byte of it is read."""
    limit = MAX_META_BYTES if name == META_FILE[0] else MAX_BATCH_BYTES
    if size > limit:
        raise SourceError(f"{what} declares {size:,} bytes, more than a genuine CIFAR-10 {name} can hold "
                          f"({limit:,}); this is not the official archive. Download it again ({URL}).")


def load_cifar10(path: str | os.PathLike, split: str, verify_md5: bool = True) -> CifarSplit:
    """Read one split ("train" or "test") of the official CIFAR-10 python version, in source order."""
    if split not in SPLIT_FILES:
        raise SourceError(f"unknown CIFAR-10 split {split!r}; choose one of {sorted(SPLIT_FILES)}")
    members = _Members(Path(path))
    digest = hashlib.sha256()
    images, labels, ids = [], [], []
    for name, md5 in (*SPLIT_FILES[split], META_FILE):
        data = members.read(name)
        digest.update(data)
        if verify_md5 and _md5(data) != md5:
            raise SourceError(
                f"{members.path}: {name} has md5 {_md5(data)}, but the published CIFAR-10 file has {md5}. "
                "The copy is damaged or not the official release: download it again, or pass --no-verify-md5 "
                "to accept a modified copy deliberately."
            )
        if name == META_FILE[0]:
            continue
        batch = safe_unpickle(data, f"{members.path}/{name}")
        x, y = _batch_arrays(batch, name)
        images.append(x)
        labels.append(y)
        ids += [f"{name}:{i}" for i in range(len(y))]
    classes = _class_names(safe_unpickle(members.read(META_FILE[0]), f"{members.path}/{META_FILE[0]}"))
    labels = np.concatenate(labels)
    if len(labels) and not 0 <= labels.min() <= labels.max() < len(classes):
        raise SourceError(f"{members.path}: labels {labels.min()}..{labels.max()}, but {META_FILE[0]} names "
                          f"{len(classes)} classes (0..{len(classes) - 1}); the copy is damaged or not CIFAR-10: "
                          f"download it again ({URL})")
    return CifarSplit(np.concatenate(images), labels, ids, classes, fingerprint=digest.hexdigest(),
                      checksum_verified=verify_md5)


def _class_names(meta: dict) -> tuple[str, ...]:
    names = meta.get("label_names")
    try:
        if not isinstance(names, list) or not names:
            raise TypeError(f"label_names is {type(names).__name__}")
        return tuple(c.decode() if isinstance(c, bytes) else str(c) for c in names)
    except (TypeError, UnicodeDecodeError) as exc:
        raise SourceError(f"{META_FILE[0]}: expected label_names, a list of the class names ({exc}); is this "
                          f"CIFAR-10's batches.meta? Download it again ({URL})") from None


def _batch_arrays(batch: dict, name: str) -> tuple[np.ndarray, np.ndarray]:
    try:  # an array as it was unpickled, not copied: a crafted 300-byte pickle can declare gigabytes
        data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"])
    except KeyError as exc:
        raise SourceError(f"{name}: batch has no {exc} entry; is this CIFAR-10 (not CIFAR-100)?") from exc
    except ValueError as exc:  # ragged lists
        raise SourceError(f"{name}: batch data or labels are not arrays ({exc})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != data.shape[:1] or data.size > MAX_BATCH_BYTES:
        raise SourceError(f"{name}: expected data [N, 3072] and N labels (N up to {MAX_BATCH_BYTES // 3072:,}), "
                          f"found {data.shape} and {labels.shape}")
    pixels = data.dtype.kind in "iu" and (not data.size or 0 <= data.min() <= data.max() <= 255)
    if not pixels or labels.dtype.kind not in "iu":
        raise SourceError(f"{name}: expected uint8 pixels and integer labels, found {data.dtype} and {labels.dtype}")
    # Stored channel-major (1024 red, 1024 green, 1024 blue, row-major): turn into HWC.
    images = data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
    return images, labels.astype(np.int64)


def download_cifar10(dest_dir: str | os.PathLike, url: str = URL, md5: str | None = ARCHIVE_MD5,
                     timeout: float = 30.0) -> Path:
    """Fetch the canonical archive into ``dest_dir`` (atomically) and check its md5; returns its path."""
    dest = Path(dest_dir) / ARCHIVE
    if dest.is_file() and (md5 is None or _file_md5(dest) == md5):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{ARCHIVE}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        if md5 is not None and _file_md5(Path(tmp)) != md5:
            raise SourceError(f"downloaded {url} but its md5 differs from the published {md5}; try again later")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise SourceError(
            f"could not download {url} ({exc}). This machine may have no internet access: fetch "
            f"{ARCHIVE} elsewhere, copy it here, and pass --source PATH/{ARCHIVE}."
        ) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def _file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_cifar10_archive(path: str | os.PathLike, train: tuple[np.ndarray, np.ndarray],
                          test: tuple[np.ndarray, np.ndarray], classes=None) -> Path:
    """Write images/labels as a CIFAR-10-python-format ``.tar.gz`` (used by the demo and the tests)."""
    from rankshard.preprocess.sources.synth import CIFAR10_CLASSES

    classes = list(classes or CIFAR10_CLASSES)
    files: dict[str, bytes] = {}
    splits = {"train": train, "test": test}
    for split, names in SPLIT_FILES.items():
        images, labels = splits[split]
        for j, (name, _) in enumerate(names):
            part = slice(j * len(images) // len(names), (j + 1) * len(images) // len(names))
            data = images[part].transpose(0, 3, 1, 2).reshape(-1, 3072)
            batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in labels[part]],
                     b"data": np.ascontiguousarray(data, dtype=np.uint8),
                     b"filenames": [f"{name}_{i}.png".encode() for i in range(len(data))]}
            files[name] = pickle.dumps(batch, protocol=2)
    files[META_FILE[0]] = pickle.dumps({b"label_names": [c.encode() for c in classes],
                                        b"num_cases_per_batch": len(train[0]) // 5, b"num_vis": 3072}, protocol=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{FOLDER}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path
