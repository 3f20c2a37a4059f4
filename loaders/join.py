"""Several variants of one materialization read side by side, joined by sample key.

Keys are global output indices shared by every variant of one materialization (same config hash), so
the same stream position holds the same key in each; the join checks that on every sample.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from rankshard.loaders.errors import LoaderError
from rankshard.loaders.pipeline import BatchTransform, collate, distributed_rank, open_shard, read_positions
from rankshard.loaders.plan import EvalPlan
from rankshard.loaders.variant import VariantInfo


@dataclass
class JoinedBatch:
    """``xs[i]``: float32 [B, C, H, W] from the i-th variant; ``y`` and ``keys`` shared by all."""

    xs: tuple[torch.Tensor, ...]
    y: torch.Tensor
    keys: list[str]
    step: int


def _check_joinable(infos: tuple[VariantInfo, ...]) -> None:
    if len(infos) < 2:
        raise LoaderError("join_variants needs at least two variants")
    first = infos[0]
    for other in infos[1:]:
        if other.manifest.get("config_hash") != first.manifest.get("config_hash") or \
                other.shard_sizes != first.shard_sizes:
            raise LoaderError(f"{other.folder} and {first.folder} come from different materializations (config "
                              "hash or shard sizes differ), so their keys name different images; join variants "
                              "written by one preprocess run")


def join_variants(*infos: VariantInfo, batch_size: int = 64, rank: int | None = None,
                  world_size: int | None = None, factors_k: int | None = None) -> Iterator[JoinedBatch]:
    """Batches of every variant's samples side by side, in manifest order, each sample exactly once
    across ranks (the evaluation partition); raises naming shard and key if the keys ever disagree."""
    _check_joinable(infos)
    rank, world_size = distributed_rank(rank, world_size)
    plan = EvalPlan(tuple(infos[0].shard_sizes), batch_size, rank, world_size)
    readers = [dict() for _ in infos]
    transform = [BatchTransform("none", tuple(i.image_size)) for i in infos]
    try:
        for j in range(plan.steps):
            positions = plan.batch_positions(j)
            xs, keys, y = [], None, None
            for n, info in enumerate(infos):
                # the variant's own checks: remote shards verified as fetched, shards open_variant rejected
                # (on_error="skip") refused; the join reads every sample with on_error="raise"
                raw = read_positions(readers[n], info.urls, plan.stream, positions, info.bad_shards,
                                     lambda s, info=info: open_shard(info.urls[s], info.shard_checks))
                k = (info.rank if factors_k is None else factors_k) if info.encoding == "factors" else None
                x, labels, got, _ = collate([raw[int(p)] for p in positions], info.encoding, k, "raise",
                                            tuple(info.image_size))
                if keys is not None and got != keys:
                    bad = next(i for i, (a, b) in enumerate(zip(got, keys)) if a != b)
                    raise LoaderError(f"{info.urls[0]}: key {got[bad]} where {infos[0].folder} has {keys[bad]}; "
                                      "the variants are not from one materialization")
                keys, y = got, labels
                xs.append(transform[n](x, 0))
            yield JoinedBatch(tuple(xs), y, keys, j)
    finally:
        for group in readers:
            for r in group.values():
                r.close()
