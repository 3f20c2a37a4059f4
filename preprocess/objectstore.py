"""Materialization to object storage (``--out s3://bucket/prefix``, or any writable fsspec URL).

Every process (one, or each ``torchrun`` rank on nodes that share no filesystem) writes its shards into a
private local staging folder exactly as a local run would (same bytes: a shard is a pure function of
source, config and index), then publishes each one:

1. the shard, uploaded under a hidden temporary key ``.NAME.<pid>-<id>.partial`` and copied to ``NAME``: an object
   named like a shard is always whole (a failed upload leaves at most the temporary key);
2. its sidecar record ``.progress/NAME.json``, only after the shard: a record means a whole shard.

Resume lists what is there (shard + record objects) and skips those shards. The manifests are assembled
from the record objects by whichever rank, on finishing, sees every record (the last one; two ranks that
both see them write identical manifests). No lock spans the nodes: a flock means nothing on S3. Safety
rests instead on idempotence (two writers of one shard upload identical bytes) and on the config object
``.rankshard-config.json``: a run with another configuration is refused before it writes anything,
and re-reading it after writing catches two different configurations racing for an empty prefix.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rankshard.preprocess.errors import ConfigMismatchError, RankshardError
from rankshard.preprocess.format.manifest import finalize_manifests, read_json
from rankshard.preprocess.format.transport import MissingError, fetch, join, transport_for
from rankshard.preprocess.pipeline import Materializer, _mismatch_message


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
        try:
            recorded = json.loads(fetch(url))
        except MissingError:
            self.store.put_file(self.layout.config_path, url)
            recorded = json.loads(fetch(url))  # re-read: another configuration may have raced us to it
        if recorded["config_hash"] != digest:
            raise ConfigMismatchError(_mismatch_message(self.remote, recorded["config"], cfg))

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
        records = [read_json(self.layout.record_path(self.variants[0], i)) for i in range(self.num_shards)]
        manifests = finalize_manifests(
            self.layout, self.variants, self.num_shards, self.source, cfg, digest, self._svd(engine),
            self.stats.as_dict(), sum(r["num_samples"] for r in records), self.image_size,
            [e for r in records for e in r.get("errors", [])], shard_bytes=self._remote_bytes)
        for v in self.variants:  # the manifest last: its presence means the variant is complete
            folder = self.layout.variant_dir(v)
            for f in sorted(folder.iterdir(), key=lambda p: p.name == "manifest.json"):
                if f.is_file() and not f.name.endswith(".tar") and not f.name.startswith("."):
                    self.store.put_file(f, self.url_of(f))
        return manifests

    def _remote_bytes(self, shard: Path) -> int:
        return self.store.size(self.url_of(shard), timeout=60)


def materialize_to_store(source, spec, url: str, overwrite: bool = False, show_progress: bool = True,
                         on_error: str = "skip", rank: int = 0, world: int = 1) -> dict:
    """``materialize_split`` for an object-storage ``url``, staging shards in a private temporary folder."""
    staging = Path(tempfile.mkdtemp(prefix=f"rankshard-stage-{rank}-"))
    try:
        result = StoreMaterializer(source, spec, staging, overwrite, show_progress, on_error, rank, world,
                                   remote=str(url).rstrip("/")).run()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {**result, "where": join(str(url), spec.dataset, spec.split)}
