"""User-facing errors: each one names the thing that is wrong and how to fix it."""
from __future__ import annotations

import functools
import sys
from typing import Callable

import click


class RankshardError(Exception):
    """An error caused by input or configuration, reported to the user without a traceback."""


class SourceError(RankshardError):
    """The dataset source is missing, corrupt, or not what it claims to be."""


class ConfigMismatchError(RankshardError):
    """An output folder holds shards made with a different configuration."""


class LockedError(RankshardError):
    """Another run is writing to the same output folder."""


def exit_on(codes: dict[type[BaseException], int]) -> Callable[[Callable], Callable]:
    """A decorator for CLI commands: the listed exceptions become ``error: <message>`` and an exit status,
    not a traceback (they are the user's to fix; anything else is a bug and keeps its traceback)."""
    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except tuple(codes) as exc:
                click.echo(f"error: {exc}", err=True)
                sys.exit(next(code for kind, code in codes.items() if isinstance(exc, kind)))
        return wrapper
    return decorate


# User mistakes (bad input, config, data, checkpoints) exit with status 2.
friendly_errors = exit_on({RankshardError: 2})
