"""Where a process runs: its place in a ``torchrun`` job and its torch device. One rule for every package,
every CLI and every rank: preprocess, the loaders, the rank engine, training and evaluation all ask here.

torch is imported where it is used, not here: the CLIs import this module, and a spawned worker re-imports
the CLI's script before its task, so a module-level ``import torch`` made every decode/write worker load
torch (~1.4 s of CPU and ~180 MB each) for work that never touches it.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Mapping

from rankshard.preprocess.errors import RankshardError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Placement:
    """Where this process sits in a ``torchrun`` job: ``rank`` of ``world`` processes, ``local_rank`` on its
    node (which GPU it owns). One process alone is ``Placement()``."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world or self.local_rank < 0:
            raise RankshardError(f"rank {self.rank} of world size {self.world} (local rank {self.local_rank}): "
                                 "need 0 <= rank < world_size and local rank >= 0; launch with torchrun, which sets "
                                 "RANK, WORLD_SIZE and LOCAL_RANK consistently")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Placement":
        """From an initialized process group if there is one (it is the truth once joined), else from
        torchrun's RANK / WORLD_SIZE / LOCAL_RANK, else a single process."""
        env = os.environ if env is None else env
        dist = sys.modules.get("torch.distributed")  # not imported yet: no process group can have been joined
        try:
            local_rank = int(env.get("LOCAL_RANK", 0))
            if dist is not None and dist.is_available() and dist.is_initialized():
                return cls(dist.get_rank(), dist.get_world_size(), local_rank)
            return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), local_rank)
        except ValueError as exc:
            raise RankshardError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers ({exc})") from None

    def device(self, choice: str | torch.device | None = "auto") -> torch.device:
        """This process's device for ``--device choice`` (see ``resolve_device``)."""
        return resolve_device(choice, self.local_rank)


def resolve_device(choice: str | torch.device | None = "auto", local_rank: int | None = None) -> torch.device:
    """The one device rule of every package and every ``torchrun`` rank: ``auto`` (or None) -> this process's
    GPU ``cuda:LOCAL_RANK`` when CUDA is present, else the CPU; ``cuda`` -> ``cuda:LOCAL_RANK``; ``cuda:i``
    and ``cpu`` as given. ``local_rank`` defaults to the environment's (``Placement.from_env``). Asking for
    CUDA without one, or for a GPU index that is not there, is a RankshardError."""
    import torch

    if local_rank is None:
        local_rank = Placement.from_env().local_rank
    if choice is None or str(choice) == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(choice)
    except RuntimeError as exc:
        raise RankshardError(f"--device {choice}: not a device; use auto, cpu, cuda or cuda:N") from exc
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise RankshardError(f"--device {choice}: no CUDA device is visible; use --device cpu (or auto)")
    device = torch.device("cuda", local_rank) if device.index is None else device
    if device.index >= torch.cuda.device_count():
        raise RankshardError(f"--device {choice}: {device} asked for (local rank {local_rank}) but only "
                             f"{torch.cuda.device_count()} CUDA device(s) are visible; start at most that many "
                             "processes per node (torchrun --nproc-per-node) or check CUDA_VISIBLE_DEVICES")
    return device


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch's CPU kernels with ``n`` intra-op threads, restoring the previous (process-wide) setting.

    Small batched LAPACK calls and small tensor ops gain nothing from torch's thread pool on a busy machine
    and lose a lot to its spinning threads (measured here: batched eigh 6x, complex svdvals up to 20x,
    quantization 2-3x slower); callers that own the cores say how many torch may use.
    """
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def process_cores() -> int:
    """The cores this process may use: those its CPU affinity allows (a container's or ``taskset``'s share,
    not the machine's count), shared among torchrun's ranks on this node."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, allowed // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
