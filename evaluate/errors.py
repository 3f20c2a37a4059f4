"""User-facing evaluation errors and the decorator that turns them into one clean message (exit status 2)."""
from __future__ import annotations

import functools
import sys

import click

from preprocess.errors import RankshardError
from train.checkpoint import CheckpointError


class EvaluationError(RankshardError):
    """Checkpoints, data and options that do not fit together (classes, input size, ranks, eps)."""


# Errors caused by what the user passed: reported as "error: ..." without a traceback.
USER_ERRORS = (RankshardError, CheckpointError)


def friendly_errors(fn):
    """Report user mistakes (RankshardError, CheckpointError) as one clear line and exit status 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
    return wrapper
