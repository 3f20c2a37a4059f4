"""One error root and one CLI error policy for the four packages."""
import importlib
import inspect
import pkgutil

import click
import pytest
from click.testing import CliRunner

from rankshard.evaluate.cli import main as evaluate_main
from rankshard.preprocess.cli import main as preprocess_main
from rankshard.preprocess.errors import RankshardError, friendly_errors
from rankshard.train.cli import main as train_main
from rankshard.train.trainer import TrainingDiverged

# Control flow inside one module, never shown to a user: caught where raised and recorded with a reason.
# caught inside their package and turned into a RankshardError that names the file (and sample)
INTERNAL = {"rankshard.preprocess.sources.images.BadImage", "rankshard.preprocess.format.codec.LabelMismatch",
            "rankshard.preprocess.workers._RemoteTraceback"}  # the cause attached to a worker error, never raised alone


def _modules():
    for package in ("preprocess", "loaders", "train", "evaluate"):
        top = importlib.import_module(f"rankshard.{package}")
        yield top
        for info in pkgutil.walk_packages(top.__path__, f"{top.__name__}."):
            if not info.name.endswith("__main__"):
                yield importlib.import_module(info.name)


def test_every_error_class_derives_from_the_root():
    found, strays = set(), []
    for module in _modules():
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__ or not issubclass(cls, Exception) or issubclass(cls, Warning):
                continue
            found.add(f"{cls.__module__}.{name}")
            if not issubclass(cls, RankshardError) and f"{cls.__module__}.{name}" not in INTERNAL:
                strays.append(f"{cls.__module__}.{name}")
    assert not strays, f"user-facing errors outside RankshardError: {strays}"
    assert {"rankshard.loaders.errors.ShardReadError", "rankshard.evaluate.errors.EvaluationError",
            "rankshard.train.trainer.TrainingDiverged", "rankshard.train.checkpoint.CheckpointError"} <= found


@pytest.mark.parametrize("error, status", [(RankshardError("bad --data"), 2), (TrainingDiverged("loss is nan"), 3)])
def test_friendly_errors_print_one_line_and_the_class_exit_status(error, status):
    @click.command()
    @friendly_errors
    def cmd():
        raise error

    res = CliRunner().invoke(cmd, [])
    assert res.exit_code == status and res.output == f"error: {error}\n"


def test_bugs_keep_their_traceback():
    @click.command()
    @friendly_errors
    def cmd():
        raise KeyError("a bug")

    assert isinstance(CliRunner().invoke(cmd, []).exception, KeyError)


def _wrapped_by_friendly_errors(fn) -> bool:
    policy = friendly_errors(lambda: None).__code__
    while fn is not None:
        if getattr(fn, "__code__", None) is policy:
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False


def _commands(cmd: click.Command, path=()):
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from _commands(sub, path + (name,))
    else:
        yield " ".join(path) or cmd.name, cmd


@pytest.mark.parametrize("cli, main", [("preprocess", preprocess_main), ("train", train_main),
                                       ("evaluate", evaluate_main)])
def test_every_command_of_the_three_clis_shares_the_policy(cli, main):
    unguarded = {name for name, cmd in _commands(main) if not _wrapped_by_friendly_errors(cmd.callback)}
    assert unguarded == set()


def test_a_filesystem_without_file_locks_is_named_with_the_way_out(tmp_path, monkeypatch):
    """NFS without lockd (ENOLCK) or Lustre without -o flock (ENOSYS): a traceback before; now what and why."""
    import errno

    from rankshard.preprocess import locking

    def refuse(fd, flags):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(locking.fcntl, "flock", refuse)
    with pytest.raises(RankshardError, match=r"refuses file locks \(No locks available\).*choose an --out folder"):
        locking.RunLock(tmp_path, 0, 1).acquire()
