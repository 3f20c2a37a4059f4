"""User-facing errors: each one names the thing that is wrong and how to fix it."""
from __future__ import annotations

import functools
import sys
from typing import Callable

import click


class RankshardError(Exception):
    """The root of every user-facing error in rankshard (all four packages): caused by input or configuration,
    reported without a traceback. ``exit_code`` is the CLI exit status it maps to."""

    exit_code = 2  # user mistakes (bad input, config, data, checkpoints); 1 is left to "verify found problems"


class SourceError(RankshardError):
    """The dataset source is missing, corrupt, or not what it claims to be."""


class ConfigMismatchError(RankshardError):
    """An output folder holds shards made with a different configuration."""


class LockedError(RankshardError):
    """Another run is writing to the same output folder."""


class DiskFullError(RankshardError):
    """The disk an output (or staging) file was being written to is full; nothing partial was kept."""


# The bad-input policy, one vocabulary for preprocess (``--on-error``) and the loaders (``on_error``):
# "raise" stops at the first unreadable input naming it; "skip" drops it and records why (manifest errors,
# loader skip counts). The defaults differ on purpose: materialization skips (one bad JPEG in 1.28 M must
# not stop a day's job, and the manifest keeps the record), loaders raise (a shard we wrote should be whole).
ON_ERROR = ("raise", "skip")


def check_on_error(value: str, what: str = "on_error") -> str:
    """``value`` if it is a bad-input policy, else a RankshardError naming the choices."""
    if value not in ON_ERROR:
        raise RankshardError(f"{what}={value!r}: choose 'raise' (stop at the first bad input) or 'skip' (skip it "
                             "and record why)")
    return value


def friendly_errors(fn: Callable) -> Callable:
    """The one error policy of the three CLIs: a ``RankshardError`` becomes ``error: <message>`` on stderr and
    its ``exit_code`` (2 unless the class says otherwise), not a traceback; it is the user's to fix. Anything
    else is a bug and keeps its traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RankshardError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
    return wrapper
