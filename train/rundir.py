"""The run folder: ``config.json``, ``metrics.jsonl``, ``curves.png`` and the checkpoints next to them.

```
RUN_DIR/config.json      resolved TrainConfig + its hash (written once; a different config is refused)
RUN_DIR/metrics.jsonl    one JSON line per epoch (train loss/top-1, lr, eval top-1/loss per variant, timing)
RUN_DIR/curves.png       loss, top-1 per variant, lr (redrawn each epoch)
RUN_DIR/last.pt          every epoch (and on a requested stop mid-epoch); --resume continues from it
RUN_DIR/last.prev.pt     the state saved before last.pt (a hard link: no extra disk); resumable with --resume-from
RUN_DIR/best.pt          best top-1 on the test variant
RUN_DIR/epoch-NNNN.pt    every --save-every epochs
```
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable

from rankshard.train.config import ConfigError, TrainConfig, config_hash, differences, from_json

STOPPED = "stopped.json"  # present while the run is stopped by a signal (what torchrun's exit status cannot say)
ARTIFACTS = ("metrics.jsonl", "curves.png", "last.pt", "last.prev.pt", "best.pt", STOPPED)
PREVIOUS = "last.prev.pt"  # the last.pt before the newest one: what --resume-from offers when last.pt is damaged


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temp file in the same folder and rename it over ``path`` (no torn files)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_config(run_dir: Path) -> TrainConfig:
    """The config a run folder was started with."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: not found; is {run_dir} a rankshard-train run folder?")
    try:
        body = json.loads(path.read_text())["config"]
    except (ValueError, KeyError, TypeError) as exc:  # hand-edited or damaged: say so instead of a traceback
        raise ConfigError(f"{path} is not valid JSON holding a 'config' entry ({exc}); restore it from the run's "
                          "last.pt ('config' field) or start again with --overwrite") from None
    return from_json(body)


def _clear(run_dir: Path) -> None:
    for name in ARTIFACTS:
        (run_dir / name).unlink(missing_ok=True)
    for path in run_dir.glob("epoch-*.pt"):
        path.unlink()


def _mismatch(run_dir: Path, diffs: dict[str, tuple], resume: bool = False) -> str:
    lines = "\n".join(f"  {k}: {old!r} (saved) -> {new!r}" for k, (old, new) in diffs.items())
    if resume:  # the user already resumes: say that a resume keeps the saved config, not "--resume it"
        return (f"--resume {run_dir} continues the run with its saved configuration, and these options "
                f"change it:\n{lines}\nDrop them from the command to resume, or train with them in another "
                "run folder (or pass --overwrite to delete this run's checkpoints and metrics and start again).")
    return (f"{run_dir} holds a run with a different configuration:\n{lines}\n"
            "Use another run folder, repeat the saved options (or --resume it), or pass --overwrite to "
            "delete that run's checkpoints and metrics and start again.")


def resume_path(run_dir: Path, source: str | os.PathLike | None = None) -> Path:
    """The checkpoint a resume reads: ``last.pt``, or ``source`` named inside the run folder
    (``last.prev.pt``) or given as a path (``runs/x/last.prev.pt``, as a shell completes it)."""
    inside = Path(run_dir) / (source or "last.pt")
    if source is not None and not inside.is_file() and Path(source).is_file():
        return Path(source)
    return inside


def _check_resumable(run_dir: Path, source: str | None) -> None:
    """Refuse a resume whose checkpoint is missing, naming the run's other whole states (a lost last.pt
    must not strand a run that still has last.prev.pt or epoch-NNNN.pt)."""
    path = resume_path(run_dir, source)
    if path.is_file():
        return
    others = [n for n in resume_candidates(run_dir) if n != path.name]
    hint = (f"; earlier states of this run: {', '.join(others)}. Continue from the newest with "
            f"`rankshard-train --resume {run_dir} --resume-from {others[0]}`") if others else ""
    raise ConfigError(f"--resume {run_dir}: no {source or 'last.pt'} there to resume from{hint}")


def prepare(run_dir: Path, cfg: TrainConfig, overwrite: bool = False, resume: bool = False,
            resume_from: str | None = None) -> None:
    """Create or check ``run_dir`` for ``cfg`` and write ``config.json`` (call on the main rank only).

    A folder with another config is refused unless ``overwrite``; a folder with the same config and a
    checkpoint needs ``resume`` (continue) or ``overwrite`` (start again), so no run is silently clobbered.
    ``resume_from``: the checkpoint the resume reads instead of last.pt (see ``resume_path``).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / "config.json").is_file() and not overwrite:
        diffs = differences(read_config(run_dir), cfg)
        if diffs:
            raise ConfigError(_mismatch(run_dir, diffs, resume))
        if (run_dir / "last.pt").is_file() and not resume:
            raise ConfigError(f"{run_dir} already holds a run with this config (last.pt); pass --resume "
                              f"{run_dir} to continue it or --overwrite to start again")
    if resume:
        _check_resumable(run_dir, resume_from)
    if overwrite:
        _clear(run_dir)
    body = {"config": cfg.to_json(), "config_hash": config_hash(cfg)}
    atomic_write_text(run_dir / "config.json", json.dumps(body, indent=2) + "\n")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All records of ``metrics.jsonl`` (empty list when there is none yet)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            # A crash during an append (power loss, full disk) leaves a torn last line without its newline.
            # Records are appended before last.pt is saved, so that epoch was never saved: drop it.
            if number == len(lines) and not text.endswith("\n"):
                break
            raise ConfigError(f"{path} line {number} is not JSON ({line[:60]!r}); repair that line "
                              "or start again with --overwrite") from None
    return records


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one epoch's record (one line; appends of a single short line do not interleave)."""
    with open(Path(run_dir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def truncate_metrics(run_dir: Path, last_epoch: int) -> None:
    """Drop records of epochs after ``last_epoch`` (written by a run that died before saving last.pt)."""
    kept = [r for r in read_metrics(run_dir) if r["epoch"] <= last_epoch]
    atomic_write_text(Path(run_dir) / "metrics.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))


def plot_curves(run_dir: Path, records: list[dict[str, Any]], lr_at: Callable[[int], float],
                steps_per_epoch: int) -> Path:
    """Draw ``curves.png``: train/test loss, top-1 per variant (and train), lr per step, against epochs."""
    import matplotlib
    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_top1, ax_lr) = plt.subplots(1, 3, figsize=(15, 4))
    ax_loss.plot(epochs, [r["train"]["loss"] for r in records], label="train")
    ax_top1.plot(epochs, [100 * r["train"]["top1"] for r in records], label="train", linestyle="--")
    variants = sorted({v for r in records for v in r.get("eval", {})})
    for v in variants:
        pts = [(r["epoch"], r["eval"][v]) for r in records if v in r.get("eval", {})]
        ax_loss.plot([e for e, _ in pts], [m["loss"] for _, m in pts], label=f"test {v}")
        ax_top1.plot([e for e, _ in pts], [100 * m["top1"] for _, m in pts], label=f"test {v}")
    last_step = records[-1]["step"] if records else 0
    stride = max(1, last_step // 2000)  # at most ~2000 points
    steps = list(range(0, last_step, stride))
    ax_lr.plot([s / steps_per_epoch for s in steps], [lr_at(s) for s in steps])
    for ax, title in ((ax_loss, "loss"), (ax_top1, "top-1 (%)"), (ax_lr, "learning rate")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    ax_loss.legend()
    ax_top1.legend()
    fig.tight_layout()
    path = Path(run_dir) / "curves.png"
    tmp = path.with_name(f".curves.{os.getpid()}.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def resume_candidates(run_dir: Path) -> list[str]:
    """Whole-run checkpoints that can stand in for a damaged last.pt, newest state first.

    Newest by when they were written (a checkpoint is written once, by an atomic rename): an epoch-NNNN.pt
    saved with the last last.pt holds a later state than last.prev.pt, the last.pt before it.
    """
    present = [n for n in (PREVIOUS, *(p.name for p in run_dir.glob("epoch-*.pt"))) if (run_dir / n).is_file()]

    def newest(name: str) -> tuple[int, int]:  # equal times (a copy that kept none): the later epoch first
        epoch = int(name[len("epoch-"):-len(".pt")]) if name.startswith("epoch-") else -1
        return (run_dir / name).stat().st_mtime_ns, epoch

    return sorted(present, key=newest, reverse=True)


def mark_stopped(run_dir: Path, epoch: int, step: int) -> None:
    """Record that a stop signal ended the run at (epoch, step) with last.pt saved. Under torchrun the launcher
    turns every worker's exit 75 into its own failure (exit 1), so scripts test for this file instead."""
    body = {"epoch": epoch, "step": step, "last_pt": "last.pt", "resume": f"rankshard-train --resume {run_dir}"}
    atomic_write_text(Path(run_dir) / STOPPED, json.dumps(body, indent=2, sort_keys=True) + "\n")


def clear_stopped(run_dir: Path) -> None:
    (Path(run_dir) / STOPPED).unlink(missing_ok=True)
