"""Will the rest of the run fit on the output disk? A projection from the shards written so far.

An ImageNet materialization runs for hours and needs hundreds of GB: a full disk found at shard 2,000
wastes the day (nothing is lost -- shards are written whole or not at all -- but the run stops there).
After every shard the bytes written per image so far, times the images still to write, are compared with
the disk's free space, and the run stops at once when they do not fit, keeping every finished shard.
"""
from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from rankshard.preprocess.errors import RankshardError
from rankshard.preprocess.progress import human_bytes


class OutOfSpaceError(RankshardError):
    """The shards still to write will not fit on the output disk."""


@dataclass
class SpaceCheck:
    """``shard_done`` after each shard this process writes; raises ``OutOfSpaceError`` when the rest won't fit
    (with ``enforce``; without, it only keeps the tally that the progress line shows).

    ``left``: input images this process still has to write; ``sharing``: processes writing about as much to
    the same disk (``torchrun`` ranks share one output folder).
    """

    folder: Path
    left: int
    sharing: int = 1
    enforce: bool = True
    images: int = 0
    bytes: int = 0

    def shard_done(self, images: int, nbytes: int) -> None:
        self.images += images
        self.bytes += nbytes
        self.left = max(self.left - images, 0)
        if not self.enforce:
            return
        need = self.projected()
        free = shutil.disk_usage(self.folder).free + self.in_flight()
        if need > free:
            raise OutOfSpaceError(
                f"{self.folder}: the rest of this run will not fit on its disk. The shards written so far hold "
                f"{human_bytes(self.bytes)} for {self.images:,} images, so the {self.left * self.sharing:,} "
                f"images left need about {human_bytes(need)}, and {human_bytes(free)} are free. Every finished "
                "shard is kept: free space, store fewer variants, or pass another --out, then rerun the same "
                "command to resume (--no-space-check carries on regardless).")

    def in_flight(self) -> int:
        """Bytes of the shards being written now (by workers, other ranks): their images are still in ``left``
        while their bytes are already off the disk's free space, so they are counted back."""
        total = 0
        for tmp in self.folder.glob("*/.*.partial"):
            with contextlib.suppress(FileNotFoundError):  # renamed into place meanwhile
                total += tmp.stat().st_size
        return total

    def projected(self) -> float:
        """Bytes the images still to write will take, at the bytes per image written so far (all processes)."""
        return self.bytes / self.images * self.left * self.sharing if self.images else 0.0

    def note(self) -> str:
        """For the progress line: what this process wrote, and the projected size of its whole share."""
        if not self.images:
            return ""
        mine = self.bytes + self.projected() / self.sharing
        return f"{human_bytes(self.bytes)} written, ~{human_bytes(mine)} at the end"
