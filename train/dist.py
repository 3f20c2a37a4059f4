"""Process-group setup for ``torchrun`` (single- and multi-node) and the few collectives the trainer uses.

``torchrun`` exports ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` for every
process, on every node (``--nnodes N --node-rank i --rdzv-endpoint host:port`` for several machines), so
``env://`` initialization covers both cases. Without those variables the run is a single process and every
collective here is the identity, so the trainer has one code path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from rankshard.preprocess.devices import Placement

# gloo runs collectives on CPU tensors, nccl on CUDA tensors (and is far faster there).
BACKENDS = {"cpu": "gloo", "cuda": "nccl"}


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank among ``world_size`` processes, and its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")  # a string such as "cuda:1" is accepted and converted
    local_rank: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", torch.device(self.device))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_choice: str = "auto") -> DistEnv:
    """Join the process group described by torchrun's environment (or run alone without it)."""
    place = Placement.from_env()
    rank, world_size, local_rank = place.rank, place.world, place.local_rank
    device = place.device(device_choice)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(BACKENDS[device.type], init_method="env://", rank=rank, world_size=world_size,
                                **kwargs)
    return DistEnv(rank, world_size, device, local_rank)


def shutdown(env: DistEnv) -> None:
    """Leave the process group (if this process joined one)."""
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (identity on one process) and return it."""
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(env: DistEnv) -> None:
    """Wait for every rank (e.g. until rank 0 has written a checkpoint the others will read)."""
    if env.distributed:
        dist.barrier()


def average_buffers(module: torch.nn.Module, env: DistEnv) -> None:
    """Average floating-point buffers (BatchNorm running mean/var) over ranks, in place.

    Each rank's BN statistics track only its own batches, so without this the ranks would evaluate (and
    rank 0 would save) slightly different models; the average is also the better population estimate.
    """
    if not env.distributed:
        return
    for buf in module.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(env.world_size)
