"""User-facing errors: each one names the thing that is wrong and how to fix it."""


class RankshardError(Exception):
    """An error caused by input or configuration, reported to the user without a traceback."""


class SourceError(RankshardError):
    """The dataset source is missing, corrupt, or not what it claims to be."""


class ConfigMismatchError(RankshardError):
    """An output folder holds shards made with a different configuration."""


class LockedError(RankshardError):
    """Another run is writing to the same output folder."""
