"""Evaluation under ``torchrun``: every sample evaluated exactly once, per-sample results gathered by key.

Each rank evaluates the samples its loader hands it and keeps ``{key: record}``; ``gather_by_key`` collects
every rank's records on rank 0 (``all_gather_object``) and merges them by key, refusing duplicates (a loader
that is not exactly-once) so that results never depend on the number of processes.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch.distributed as dist

from rankshard.train.dist import DistEnv, init_distributed

from rankshard.evaluate.errors import EvaluationError


# Evaluation's view of its place in a torchrun job is the trainer's: rank, world size, device.
DistContext = DistEnv


def init_from_env(device: str = "auto") -> DistContext:
    """Join the ``torchrun`` process group when ``WORLD_SIZE`` > 1 (the trainer's setup: NCCL on CUDA, gloo on CPU)."""
    return init_distributed(device)


def merge_by_key(parts: Iterable[Mapping[str, dict]]) -> dict[str, dict]:
    """One ``{key: record}`` from each rank's records, sorted by key; a key seen twice is an error."""
    merged: dict[str, dict] = {}
    for part in parts:
        for key, record in part.items():
            if key in merged:
                raise EvaluationError(f"sample {key} was evaluated by more than one rank: the evaluation loader is "
                                      f"not exactly-once (use loaders.eval_loader with rank and world_size)")
            merged[key] = record
    return dict(sorted(merged.items()))


def gather_by_key(records: Mapping[str, dict], ctx: DistContext) -> dict[str, dict] | None:
    """All ranks' records merged by key on rank 0 (``None`` on the other ranks)."""
    if not ctx.distributed:
        return merge_by_key([records])
    parts: list = [None] * ctx.world_size
    dist.all_gather_object(parts, dict(records))
    return merge_by_key(parts) if ctx.is_main else None


def check_complete(records: Mapping[str, dict], expected: int, what: str) -> None:
    """Refuse to report on a partial evaluation (lost samples would bias every metric silently)."""
    if len(records) != expected:
        raise EvaluationError(f"{what}: evaluated {len(records)} samples but the data holds {expected}; "
                              f"a shard is missing or unreadable (run `rankshard-preprocess verify`)")
