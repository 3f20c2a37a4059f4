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


class Unfetched(str):
    """A reason a sample could not be read that lies in the way to the shard (its server, the network after
    the retries), not in the shard: rewriting it would not help. A missing local file or bytes that differ
    from the manifest are the shard's own problem and keep the plain reason."""


def shard_error(shard: str, key: str | None, reason: str) -> ShardReadError:
    """The error for a bad sample, naming the shard, the key and the fix (which depends on the reason)."""
    where = f"sample {key}" if key else "a sample"
    if isinstance(reason, Unfetched):
        fix = ("Check that the path or URL is reachable from this machine (server up, credentials, network), "
               "then rerun")
    else:
        fix = ("Check the shards with `rankshard-preprocess verify <root>` and rewrite this one (delete it and "
               "rerun the preprocess command)")
    return ShardReadError(f"{shard}: {where}: {reason}. {fix}, or pass on_error='skip' to skip and count such "
                          "samples.")


class LoaderWarning(UserWarning):
    """Emitted at the end of an epoch in which samples were skipped (on_error='skip')."""
