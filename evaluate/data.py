"""Evaluation data as the metrics see it: class count, image size, sample count and a batch stream per rank.

``EvalData.batches(rank, world_size)`` yields objects with ``x`` [B, C, H, W] in [0, 1], ``y`` [B] and
``keys`` (sample keys, SPEC's 8-digit global index); across all ranks every sample comes exactly once.
``shard_data`` reads materialized shards through ``loaders``; ``tensor_data`` serves tensors held in memory
(tests, benchmarks, notebooks) with the same contract.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch

from rankshard.evaluate.errors import EvaluationError
from rankshard.loaders.plan import rank_part
from rankshard.loaders.variant import subfolders


class EvalBatch(NamedTuple):
    """A batch of images in [0, 1] with labels and sample keys (the fields of ``loaders.Batch``)."""

    x: torch.Tensor
    y: torch.Tensor
    keys: list[str]


@dataclass(frozen=True)
class EvalData:
    """One evaluation set: ``name`` (e.g. ``cifar10/test/full``) labels every result computed on it."""

    name: str
    num_classes: int
    image_size: tuple[int, int]
    num_samples: int
    batches: Callable[[int, int], Iterator]  # (rank, world_size) -> batches with x, y, keys
    classes: tuple[str, ...] = ()

    def samples_of(self, rank: int, world_size: int) -> int:
        """How many samples rank ``rank`` of ``world_size`` evaluates (``rank_part``): its progress bar's total."""
        return len(rank_part(self.num_samples, rank, world_size))


def check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise EvaluationError(f"--limit {limit}: must be a positive number of samples (omit it to use them all)")


def tensor_data(x: torch.Tensor, y: torch.Tensor, num_classes: int, batch_size: int = 64, name: str = "tensors",
                keys: Sequence[str] | None = None, limit: int | None = None) -> EvalData:
    """In-memory evaluation data; rank r of w gets its ``rank_part`` (exactly once over all ranks)."""
    check_limit(limit)
    n = len(y) if limit is None else min(limit, len(y))
    keys = [f"{i:08d}" for i in range(len(y))] if keys is None else list(keys)
    if len(keys) != len(y) or x.shape[0] != len(y) or x.dim() != 4:
        raise EvaluationError(f"tensor_data: need x [N, C, H, W], y [N] and N keys, got {tuple(x.shape)}, "
                              f"{tuple(y.shape)} and {len(keys)} keys")

    def batches(rank: int = 0, world_size: int = 1) -> Iterator[EvalBatch]:
        mine = list(rank_part(n, rank, world_size))
        for start in range(0, len(mine), batch_size):
            idx = mine[start:start + batch_size]
            yield EvalBatch(x[idx], y[idx], [keys[i] for i in idx])

    return EvalData(name, num_classes, (int(x.shape[-2]), int(x.shape[-1])), n, batches)


def resolve_dataset(root: str | Path, dataset: str | None) -> str:
    """``dataset`` as given, else the only dataset folder under ``root`` (else an error listing them)."""
    if dataset:
        return dataset
    found = sorted(p.name for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else []
    if len(found) != 1:
        raise EvaluationError(f"--data {root}: pass --dataset; found dataset folders {found or 'none'} "
                              f"(layout ROOT/<dataset>/<split>/<variant>/)")
    return found[0]


def check_layout(root: str | Path, dataset: str, split: str, variant: str) -> None:
    """Name the option that is wrong (--dataset, --split or --variant) and what exists instead, before the
    loader reports a missing manifest: e.g. ``--split val`` on CIFAR-10, which has only ``test``."""
    levels = (("--dataset", Path(root), dataset), ("--split", Path(root) / dataset, split),
              ("--variant", Path(root) / dataset / split, variant))
    for option, parent, name in levels:
        if not (parent / name).is_dir():
            raise EvaluationError(f"{option} {name}: no folder {parent / name}; {parent} holds "
                                  f"{subfolders(parent) or 'nothing'} (layout ROOT/<dataset>/<split>/<variant>/)")


def _first_samples(info, n: int):
    """``info`` restricted to the first ``n`` samples of the manifest order: the shards that hold them, the last
    one counted only up to the n-th sample, so the loader's ranks split those n samples (not the whole shards:
    rank 0 got them all under torchrun) and read nothing after them."""
    keep, total = 0, 0
    while total < n:
        total += info.shard_sizes[keep]
        keep += 1
    sizes = list(info.shard_sizes[:keep])
    sizes[-1] -= total - n
    return replace(info, urls=info.urls[:keep], shard_sizes=sizes, num_samples=n)


def _key_bound(manifest: dict, n: int) -> int:
    """One past the key of the n-th sample in manifest order. Keys are output positions, fixed before decoding,
    so each input skipped at materialization (``errors``, by position) leaves a gap: the first n samples then
    reach beyond key n - 1."""
    gaps = sorted(e["index"] for e in manifest.get("errors", ()) if isinstance(e, dict) and isinstance(e.get("index"), int))
    end = n
    for gap in gaps:
        if gap >= end:
            break
        end += 1
    return end


def _position(key: str) -> int:
    try:
        return int(key)
    except ValueError:
        raise EvaluationError(f"sample key {key!r} is not SPEC's 8-digit global index; --limit needs "
                              f"shards written by rankshard-preprocess") from None


def shard_data(root: str | Path, dataset: str | None, split: str, variant: str, batch_size: int = 128,
               workers: int = 2, limit: int | None = None, verify_shards: bool = True) -> EvalData:
    """Materialized shards ``ROOT/<dataset>/<split>/<variant>`` through ``loaders.eval_loader`` (exactly once).

    ``limit`` keeps the first N samples of the manifest order (keys 0..N-1, SPEC's global output index, or
    beyond where inputs were skipped at materialization), reading only the shards that hold them.
    """
    from rankshard.loaders import LoaderConfig, eval_loader, open_variant

    check_limit(limit)
    dataset = resolve_dataset(root, dataset)
    check_layout(root, dataset, split, variant)
    info = open_variant(root, dataset, split, variant, verify_shards=verify_shards)
    n = info.num_samples if limit is None else min(limit, info.num_samples)
    end = _key_bound(info.manifest, n)
    info = _first_samples(info, n) if n < info.num_samples else info
    cfg = LoaderConfig(batch_size=batch_size, workers=workers)

    def batches(rank: int = 0, world_size: int = 1) -> Iterator[EvalBatch]:
        for batch in eval_loader(info, cfg, rank=rank, world_size=world_size):
            keep = [i for i, key in enumerate(batch.keys) if _position(key) < end]
            if keep:
                yield EvalBatch(batch.x[keep], batch.y[keep], [batch.keys[i] for i in keep])

    return EvalData(f"{dataset}/{split}/{variant}", info.num_classes, tuple(info.image_size), n, batches,
                    tuple(info.classes))
