"""Loader errors: each names the shard (and sample key) at fault and how to fix it."""
from __future__ import annotations

from rankshard.preprocess.errors import RankshardError


class LoaderError(RankshardError):
    """A variant cannot be opened or a loader is misconfigured."""


class ShardReadError(LoaderError):
    """A shard is corrupt or truncated, or one of its samples does not decode.

    Takes one message argument so that torch's DataLoader can re-raise it, with the worker's traceback
    text, as this same type in the main process; build it with ``shard_error``.
    """


def shard_error(shard: str, key: str | None, reason: str) -> ShardReadError:
    """The error for a bad sample, naming the shard, the key and the fix."""
    where = f"sample {key}" if key else "a sample"
    return ShardReadError(f"{shard}: {where}: {reason}. Check the shards with `rankshard-preprocess verify "
                          f"<root>` and rewrite this one (delete it and rerun the preprocess command), or "
                          f"pass on_error='skip' to skip and count such samples.")


class LoaderWarning(UserWarning):
    """Emitted at the end of an epoch in which samples were skipped (on_error='skip')."""
