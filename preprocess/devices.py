"""Which torch device a command runs on: one rule for every CLI and every ``torchrun`` rank."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from rankshard.preprocess.errors import RankshardError


def resolve_device(choice: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` (or None) -> this process's GPU ``cuda:LOCAL_RANK`` when CUDA is present, else the CPU;
    ``cuda`` -> ``cuda:LOCAL_RANK``; ``cuda:i`` and ``cpu`` as given. Asking for CUDA without one is an error."""
    if choice is None or str(choice) == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(choice)
    except RuntimeError as exc:
        raise RankshardError(f"--device {choice}: not a device; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RankshardError(f"--device {choice}: no CUDA device is visible; use --device cpu (or auto)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch's CPU kernels with ``n`` intra-op threads, restoring the previous (process-wide) setting.

    Small batched LAPACK calls and small tensor ops gain nothing from torch's thread pool on a busy machine
    and lose a lot to its spinning threads (measured here: batched eigh 6x, complex svdvals up to 20x,
    quantization 2-3x slower); callers that own the cores say how many torch may use.
    """
    saved = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(saved)
