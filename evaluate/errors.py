"""User-facing evaluation errors and the decorator that turns them into one clean message (exit status 2)."""
from __future__ import annotations

from rankshard.preprocess.errors import RankshardError, friendly_errors  # noqa: F401 (re-exported for subcommands)


class EvaluationError(RankshardError):
    """Checkpoints, data and options that do not fit together (classes, input size, ranks, eps)."""
