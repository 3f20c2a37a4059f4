"""What each stage of a study does, as top-level functions of a plain ``job`` dict (so a process pool can run
them): materialize the data once, train one (variant, seed), run one evaluation on one checkpoint, write the
report. They call the same code as the CLIs -- the click commands themselves for preprocess and evaluate, so
a study option means exactly what the command's flag means."""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any

import click

from rankshard.evaluate.errors import EvaluationError


class StageFailed(EvaluationError):
    """A stage's command stopped with an error; the message holds the command line and its last output."""


def _invoke(command: click.Command, args: list[str], what: str, quiet: bool) -> None:
    """Run a click command in this process; its stdout is kept (shown only on failure) when ``quiet``."""
    buf = io.StringIO()
    redirect = contextlib.redirect_stdout(buf) if quiet else contextlib.nullcontext()
    try:
        with redirect:
            command.main(args, prog_name=what, standalone_mode=False)
    except SystemExit as exc:  # friendly_errors: the message is already on stderr
        if exc.code not in (0, None):
            raise StageFailed(f"`{what} {' '.join(args)}` failed (exit {exc.code}); output:\n{buf.getvalue()[-2000:]}") from None
    except click.ClickException as exc:
        raise StageFailed(f"`{what} {' '.join(args)}`: {exc.format_message()}") from None


def flags(options: dict[str, Any]) -> list[str]:
    """``{"eps": "4/255", "targeted": True, "variant": ["full", "rank-004"]}`` -> ``--eps 4/255 --targeted
    --variant full --variant rank-004`` (false -> ``--no-NAME``; lists repeat the flag)."""
    out = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else f"--no-{key.replace('_', '-')}")
        elif isinstance(value, (list, tuple)):
            for item in value:
                out += [flag, str(item)]
        else:
            out += [flag, str(value)]
    return out


def _variant_flags(mat: dict) -> list[str]:
    out = []
    for key in ("ranks", "high", "lowpass", "highpass"):
        out += [f"--{key}", ",".join(map(str, mat[key]))]  # empty string: none (the default ranks are replaced)
    out += ["--encoding", mat["encoding"], "--backend", mat["backend"]]
    return out + (["--shard-size", str(mat["shard_size"])] if mat["shard_size"] else []) + list(mat["args"])


def materialize(job: dict) -> None:
    """One ``rankshard-preprocess`` pass per source writing every variant of ``job["materialize"]``."""
    from rankshard.preprocess.cli_cifar import cifar10_command
    from rankshard.preprocess.cli_images import folder_command, imagenet_command
    from rankshard.preprocess.demo import build_demo_archive

    data, out = job["data"], Path(job["out"])
    common = ["--out", str(out), "--workers", str(job["workers"]), "--device", job["device"], "--quiet",
              "--overwrite"] + _variant_flags(job["materialize"]) + list(data["args"])
    if data["source"] in ("demo", "cifar10"):
        archive = data["path"] or str(build_demo_archive(Path(job["scratch"]), data["per_class"], data["test_per_class"]))
        extra = ["--no-verify-md5"] if data["source"] == "demo" else []
        _invoke(cifar10_command, ["--source", archive] + extra + common, "rankshard-preprocess cifar10", True)
        return
    for split in data["splits"]:
        if data["source"] == "imagenet":
            _invoke(imagenet_command, ["--source", data["path"], "--split", split] + common,
                    "rankshard-preprocess imagenet", True)
        else:
            _invoke(folder_command, ["--source", str(Path(data["path"]) / split), "--name", data["dataset"],
                                     "--split", split] + common, "rankshard-preprocess folder", True)


def train(job: dict) -> None:
    """One ``rankshard-train`` run; resumed from last.pt when the folder holds the same config, else restarted."""
    from rankshard.train import rundir
    from rankshard.train.config import differences, from_json
    from rankshard.train.run import run

    cfg, run_dir = from_json(job["config"]), Path(job["out"])
    resume = (run_dir / "last.pt").is_file() and (run_dir / "config.json").is_file() \
        and not differences(rundir.read_config(run_dir), cfg)
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        run(cfg, run_dir, resume=resume, overwrite=not resume, log=lambda _: None, progress=False)


def evaluate(job: dict) -> None:
    """One ``rankshard-evaluate COMMAND`` on one checkpoint; data flags are added for commands that read data."""
    from rankshard.evaluate.cli import main

    command = main.commands[job["command"]]
    params = {p.name for p in command.params}
    args = [f"{job['checkpoint_name']}={job['checkpoint']}", "--out", job["out"]]
    if "root" in params:
        args += ["--data", job["data_root"], "--dataset", job["dataset"], "--split", job["split"]]
    args += ["--device", job["device"]] if "device" in params else []
    args += ["--workers", str(job["workers"])] if "workers" in params and "workers" not in job["options"] else []
    args += ["--quiet"] if "quiet" in params else []
    _invoke(command, args + flags(job["options"]), f"rankshard-evaluate {job['command']}", True)


def report(job: dict) -> None:
    """``rankshard-evaluate report`` over every evaluation and training run of the study."""
    from rankshard.evaluate.report import build_report

    build_report(job["sources"], job["out"], runs=job["runs"])


EXECUTE = {"materialize": materialize, "train": train, "evaluate": evaluate, "report": report}


def execute(kind: str, job: dict) -> None:
    """Entry point of a stage, in this process or a pool worker."""
    EXECUTE[kind](job)
