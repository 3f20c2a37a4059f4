"""Materialization to object storage (``--out s3://bucket/prefix``, or any writable fsspec URL).

Every process (one, or each ``torchrun`` rank on nodes that share no filesystem) writes its shards into a
private local staging folder exactly as a local run would (same bytes: a shard is a pure function of
source, config and index), then publishes each one:

1. the shard, uploaded under a hidden temporary key ``.NAME.<pid>-<id>.partial`` and copied to ``NAME``: an object
   named like a shard is always whole (a failed upload leaves at most the temporary key);
2. its sidecar record ``.progress/NAME.json``, only after the shard: a record means a whole shard.

Before anything heavy, a tiny probe key is written and deleted under the prefix: a missing bucket, missing
credentials or a prefix we may not write are named at once (``transport._store_error``). Probe keys that
killed runs left (``.rankshard-probe.<pid>-<id>``) are deleted then too.

Resume lists what is there (shard + record objects) and skips those shards, and deletes the temporary keys
a killed run left for its shards (the finishing rank sweeps any left). On S3 it also aborts the incomplete
multipart uploads of those same keys (s3fs uploads a file above ~100 MiB in parts; a kill mid-upload leaves
them, unlisted and billed): one rule for both (``_sweep``). That needs s3:ListBucketMultipartUploads and
s3:AbortMultipartUpload; a store that refuses is one ``StoreWarning`` per run, not an error (the bucket's
lifecycle rule ``AbortIncompleteMultipartUpload`` is the alternative). The staging folder is in ``TMPDIR``,
held by an flock; the next run removes those of killed runs. The manifests are assembled
from the record objects by whichever rank, on finishing, sees every record (the last one; two ranks that
both see them write identical manifests). No lock spans the nodes: a flock means nothing on S3. Safety
rests instead on idempotence (two writers of one shard upload identical bytes) and on the config object
``.rankshard-config.json``: a run with another configuration is refused before it writes anything. It is
written with a conditional PUT (``If-None-Match: *``), so of two configurations racing for an empty prefix
the second is refused; on a store that ignores the condition, re-reading it and checking every record's
``config_hash`` before the manifests still refuses a mix.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

from rankshard.preprocess.errors import ConfigMismatchError, DiskFullError, RankshardError
from rankshard.preprocess.locking import flock
from rankshard.preprocess.format.manifest import finalize_manifests, read_json
from rankshard.preprocess.format.transport import MissingError, TransportError, fetch, join, transport_for
from rankshard.preprocess.pipeline import Materializer, _mismatch_message

PROBE = ".rankshard-probe."  # then <pid>-<id>: an empty key written and deleted to test the prefix at the start


class StoreWarning(UserWarning):
    """Object storage housekeeping that could not be done (the run itself is whole)."""


@dataclass
class StoreMaterializer(Materializer):
    """A ``Materializer`` whose ``out`` is a local staging folder mirrored to the URL ``remote``."""

    remote: str = ""
    keeps_shards = False  # each shard leaves the staging folder once uploaded: no disk projection here

    def __post_init__(self):
        if self.overwrite:
            raise RankshardError(f"{self.remote}: --overwrite is not supported on object storage (deleting another "
                                 "run's objects cannot be made safe there); delete the prefix (e.g. `aws s3 rm "
                                 "--recursive`) or choose another --out")
        self.store = transport_for(self.remote)
        if not self.store.writable:
            raise RankshardError(f"{self.remote}: cannot write there; --out takes a local folder, s3:// or another "
                                 "writable fsspec URL")
        super().__post_init__()
        self._listing: dict[str, set[str]] = {}
        self._uploads_refused = False  # the store refused to list or abort multipart uploads: warned, not asked again
        self._probe()

    def _probe(self) -> None:
        """Write and delete a tiny key under the prefix: a missing bucket, missing credentials or a prefix we may
        not write are named now, before the engine is built and any shard is computed."""
        url = join(self.remote, f"{PROBE}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            self.store.put_bytes(b"", url)
        except TransportError as exc:  # named by the prefix the user gave, not by the probe's key
            raise TransportError(str(exc).replace(url, self.remote)) from None
        with contextlib.suppress(TransportError):  # a policy may grant writes but not deletes: empty keys stay
            self.store.delete(url)
            self._sweep_probes()

    def _sweep_probes(self) -> None:
        """Delete the probe keys that runs killed between a probe's write and its delete left under the prefix.
        One that a rank starting this moment has just written may go too: harmless, a probe is never read (its
        write was the test) and its own delete then finds nothing, which is no error."""
        for name in self.store.names(self.remote):
            if name.startswith(PROBE):
                self.store.delete(join(self.remote, name))

    can_overwrite = False

    @property
    def where(self) -> str:
        return join(self.remote, self.spec.dataset, self.spec.split)  # not the staging folder

    def url_of(self, local: Path) -> str:
        return join(self.remote, Path(local).relative_to(self.out).as_posix())

    # -- what is already there ---------------------------------------------------------------------
    def _refresh(self) -> None:
        """List every variant folder's shards and records once (a resume check per shard would cost a request)."""
        self._listing = {}
        for v in self.variants:
            folder = self.url_of(self.layout.variant_dir(v))
            self._listing[v.name] = set(self.store.names(folder)) | {
                f".progress/{n}" for n in self.store.names(join(folder, ".progress"))}

    def _done(self, index: int) -> bool:
        name = self.layout.shard_name(index)
        return all(name in self._listing.get(v.name, ()) and f".progress/{name}.json" in self._listing[v.name]
                   for v in self.variants)

    def _engine_and_config(self):
        config = self.layout.config_path
        try:
            config.parent.mkdir(parents=True, exist_ok=True)
            config.write_bytes(fetch(self.url_of(config)))
        except MissingError:
            config.unlink(missing_ok=True)
        self._refresh()
        return super()._engine_and_config()

    def _prepare_dirs(self, engine, cfg: dict, digest: str) -> None:
        super()._prepare_dirs(engine, cfg, digest)
        url = self.url_of(self.layout.config_path)
        # written only if absent (a conditional PUT): of two runs with different configurations racing for an
        # empty prefix, one writes it and the other reads it and is refused; re-read where a store ignores the
        # condition, and the records' configuration is checked again before the manifests are written
        try:
            recorded = json.loads(fetch(url))  # there already (a resume, another rank): no write at all
        except MissingError:
            self.store.put_new(self.layout.config_path.read_bytes(), url)
            recorded = json.loads(fetch(url))
        if recorded["config_hash"] != digest:
            raise ConfigMismatchError(_mismatch_message(self.where, recorded["config"], cfg, can_overwrite=False))
        self._sweep(lambda name: (index := self.layout.partial_index(name)) is not None and self._mine(index))

    def _sweep(self, which) -> None:
        """Delete the temporary upload keys (``.NAME.<pid>-<id>.partial``) of the listing that ``which(name)``
        picks, and abort the incomplete multipart uploads (S3) of such keys: left by a run killed mid-upload,
        never a complete object. The same rule decides for both: at the start ``which`` picks only this rank's
        shards (other ranks may be uploading theirs), at the end everything (every shard is published: what
        is left is a killed run's). Should one belong to an upload in flight (another run of this
        configuration), that upload finds its key or its upload gone and uploads again (``put_file``)."""
        def ours(name: str) -> bool:  # a temporary key directly in a variant folder or its .progress
            where, _, base = name.rpartition("/")
            return where in ("", ".progress") and base.startswith(".") and base.endswith(".partial") and which(base)
        for v in self.variants:
            folder = self.url_of(self.layout.variant_dir(v))
            for name in sorted(filter(ours, self._listing.get(v.name, ()))):
                self.store.delete(join(folder, name))
            self._sweep_uploads(folder, ours)

    def _sweep_uploads(self, folder: str, which) -> None:
        """``store.sweep_uploads``; a refusal (the permissions are separate, often not granted) is one warning
        per run, not an error: what is left costs money but breaks nothing."""
        if self._uploads_refused:
            return
        try:
            self.store.sweep_uploads(folder, which)
        except TransportError as exc:
            self._uploads_refused = True
            # named by the split: refused once, the other folders are not asked
            warnings.warn(f"{str(exc).replace(folder, self.where)}; the run goes on", StoreWarning, stacklevel=2)

    # -- publishing ----------------------------------------------------------------------------------
    def _collect(self, result, bar) -> None:
        super()._collect(result, bar)
        index = result[0]
        for v in self.variants:
            shard, record = self.layout.shard_path(v, index), self.layout.record_path(v, index)
            self.store.put_file(shard, self.url_of(shard))     # whole, via a temporary key
            self.store.put_file(record, self.url_of(record))   # then its record: "this shard is done"
            shard.unlink()  # staging holds only shards in flight: a node needs no disk for the whole split

    def _finalize(self, engine, cfg: dict, digest: str) -> dict | None:
        self._refresh()
        if not all(self._done(i) for i in range(self.num_shards)):
            return None
        for v in self.variants:
            for i in range(self.num_shards):
                record = self.layout.record_path(v, i)
                record.parent.mkdir(parents=True, exist_ok=True)
                record.write_bytes(fetch(self.url_of(record)))
        for v in self.variants:
            for i in range(self.num_shards):
                if (found := read_json(self.layout.record_path(v, i)).get("config_hash")) != digest:
                    raise ConfigMismatchError(
                        f"{self.url_of(self.layout.shard_path(v, i))} was made with configuration {found}, this run "
                        f"with {digest}: another run with other options wrote into {self.remote} at the same time. "
                        "Delete the prefix and rerun one of them, or give each its own --out")
        manifests = finalize_manifests(
            self.layout, self.variants, self.num_shards, self.source, cfg, digest, self._svd(engine),
            self.stats.as_dict(), self.image_size, shard_bytes=self._remote_bytes)
        for v in self.variants:  # the manifest last: its presence means the variant is complete
            folder = self.layout.variant_dir(v)
            for f in sorted(folder.iterdir(), key=lambda p: p.name == "manifest.json"):
                if f.is_file() and not f.name.endswith(".tar") and not f.name.startswith("."):
                    self.store.put_file(f, self.url_of(f))
        self._sweep(lambda name: True)  # every shard is published: any temporary key left is a killed run's
        return manifests

    def _remote_bytes(self, shard: Path) -> int:
        return self.store.size(self.url_of(shard), timeout=60)


STAGING_PREFIX = "rankshard-stage-"
STAGING_LOCK = ".rankshard-staging.lock"
STALE_STAGING_S = 60  # a folder is claimed (its lock taken) within moments of being made


@contextlib.contextmanager
def staging_folder(rank: int):
    """A private staging folder in the temporary directory (``TMPDIR``), held by an flock for this process's
    life and removed on the way out; folders left by killed runs (their lock free: the kernel releases it
    with the process) are removed on the way in."""
    _sweep_staging(Path(tempfile.gettempdir()))
    staging = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix()}{rank}-"))
    fd = os.open(staging / STAGING_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        flock(fd, fcntl.LOCK_EX, staging, "set TMPDIR to a folder on a local disk")
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        os.close(fd)


def _staging_prefix() -> str:
    # the host in the name: a TMPDIR shared between nodes (a home or scratch folder) may keep flocks per node,
    # where another node's live lock looks free; each host sweeps only its own runs' folders
    return f"{STAGING_PREFIX}{socket.gethostname()}-"


def _sweep_staging(tmp: Path) -> None:
    now = time.time()
    for folder in tmp.glob(f"{_staging_prefix()}*"):
        lock = folder / STAGING_LOCK
        with contextlib.suppress(OSError):
            if not folder.is_dir() or now - lock.stat().st_mtime < STALE_STAGING_S:
                continue  # no lock file (not ours to judge), or one just made
            fd = os.open(lock, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: its run is alive
                shutil.rmtree(folder, ignore_errors=True)
            finally:
                os.close(fd)


def materialize_to_store(source, spec, url: str, overwrite: bool = False, show_progress: bool = True,
                         on_error: str = "skip", rank: int = 0, world: int = 1) -> dict:
    """``materialize_split`` for an object-storage ``url``, staging shards in a private temporary folder."""
    with staging_folder(rank) as staging:
        try:
            result = StoreMaterializer(source, spec, staging, overwrite, show_progress, on_error, rank, world,
                                       remote=str(url).rstrip("/")).run()
        except DiskFullError as exc:
            raise DiskFullError(f"{exc}\n(That folder stages the shards in flight on their way to {url}, about "
                                "one shard per variant per worker: set TMPDIR to a folder on a disk with room for "
                                "them.)") from exc
    return {**result, "where": join(str(url), spec.dataset, spec.split)}
