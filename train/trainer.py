"""The trainer: one class whose methods each do one thing (setup, a step, an epoch, evaluation, saving).

Reproducibility: every source of randomness is a pure function of ``(seed, epoch, step, rank)`` (data
order and augmentation in the loader, PGD random starts here) or is restored from the checkpoint (global
torch RNG, optimizer state, BN statistics), and the lr is a pure function of the step. On CPU an
interrupted-and-resumed run therefore ends with bit-identical weights to an uninterrupted one (tested).

Adversarial training (Madry et al. PGD-AT): each batch is replaced by PGD examples made against the current
weights with the model in **eval mode** (BN running statistics, no statistics update), then the model is
switched back to train mode for the update step. This is what MadryLab ``robustness`` does
(``AttackerModel.forward``: ``self.eval()`` before ``self.attacker(...)``, ``self.train()`` after), so
the robust baselines match the models the paper compares against; attacking in train mode would let the
BN batch statistics absorb every PGD iterate and depend on the batch composition.
"""
from __future__ import annotations

import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from rankshard.train import rundir
from rankshard.train.attacks import PGDConfig, parse_eps, pgd
from rankshard.preprocess.errors import RankshardError
from rankshard.train.checkpoint import (CheckpointError, checkpoint_payload, keep_previous, load_checkpoint,
                                        save_checkpoint)
from rankshard.train.config import ConfigError, TrainConfig, config_hash
from rankshard.train.data import Batch, TrainData
from rankshard.train.dist import DistEnv, all_reduce_sum, average_buffers, barrier
from rankshard.train.models import ResNet, build_model
from rankshard.train.schedule import Schedule


class TrainingDiverged(RankshardError, RuntimeError):
    """The loss became NaN or infinite; the run stopped and kept its last good checkpoint."""

    exit_code = 3  # not a usage mistake: scripts can tell "diverged, lower the lr" from "bad options"


class TrainingStopped(RankshardError):
    """A stop signal (SIGTERM/SIGUSR1: a preemption) ended the run before its last epoch; last.pt is saved."""

    # EX_TEMPFAIL (sysexits.h): not finished, rerun to continue. Never 0, so `rankshard-train ... &&
    # rankshard-evaluate ...` does not evaluate a half-trained model and a requeue script can tell.
    exit_code = 75


def parameter_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> list[dict[str, Any]]:
    """SGD parameter groups: with ``decay_norm_and_bias=False``, 1-d parameters (BatchNorm weights and
    biases, conv/fc biases) get no weight decay, since shrinking them only rescales activations."""
    if decay_norm_and_bias:
        return [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def rng_state() -> dict[str, Any]:
    """Global torch RNG states (CPU and every CUDA device) as weights_only-safe tensors."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` saved (CUDA states only where the devices exist)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _stream_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. seed, step, rank, chunk): distinct streams for distinct tuples."""
    value = 0
    for p in parts:
        value = (value * 1_000_003 + int(p)) % (1 << 63)
    return value


# Narrowest model trained on CPU. Below 8 channels (one AVX2 register of floats), torch's bundled oneDNN
# kernel for 1x1-convolution weight gradients hung or crashed (issue 12): see benchmarks/repro_narrow_conv.py.
MIN_CPU_WIDTH = 8


def check_cpu_width(width: int, device: torch.device) -> None:
    """Refuse widths that crash torch's CPU backward (ConfigError: exit 2), with the reproduction to run."""
    if device.type == "cpu" and width < MIN_CPU_WIDTH:
        raise ConfigError(
            f"--width {width} on CPU: training models narrower than {MIN_CPU_WIDTH} channels hangs or crashes "
            "inside torch's oneDNN 1x1-convolution backward (jit_avx2_1x1_convolution_bwd_weights; not rankshard "
            f"code). Use --width {MIN_CPU_WIDTH} or more, or a GPU. Minimal reproduction without rankshard: "
            "python benchmarks/repro_narrow_conv.py")


class Trainer:
    """Train ``cfg``'s model on ``data`` into ``run_dir`` (one process of a DDP job, or alone)."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, data: TrainData, env: DistEnv | None = None,
                 log: Callable[[str], None] = print, progress: bool = True):
        self.cfg, self.run_dir, self.data = cfg, Path(run_dir), data
        self.env = env or DistEnv()
        self.log = log if self.env.is_main else (lambda _msg: None)
        self.show_progress = progress
        self.device = self.env.device
        check_cpu_width(cfg.width, self.device)
        self.per_rank_batch = self._per_rank_batch()
        self.use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and self.device.type == "cuda")
        self.steps_per_epoch = len(data.train_batches(0, self.per_rank_batch, self.env.rank, self.env.world_size))
        self.schedule = Schedule(cfg, self.steps_per_epoch)
        self.model, self.train_model = self._build_model()
        self.optimizer = torch.optim.SGD(
            parameter_groups(self.model, cfg.weight_decay, cfg.wd_on_norm_and_bias), lr=self.schedule.lr(0),
            momentum=cfg.momentum, nesterov=cfg.nesterov)
        self.epoch = 0         # completed epochs
        self.step = 0          # completed optimizer steps (global counter)
        self.best_top1 = -1.0
        self.partial = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, correct, count
        self.running = self.partial.clone()  # all ranks' sums at the last check, for the progress line
        self.stop_requested = False  # this process got a stop signal
        self.stopped = False         # the ranks agreed to stop on one (any rank's signal stops them all)
        self.adv = (PGDConfig(cfg.adv_norm, parse_eps(cfg.adv_eps), cfg.adv_steps,
                              parse_eps(cfg.adv_step_size) if cfg.adv_step_size else None)
                    if cfg.adv_enabled else None)

    # ------------------------------------------------------------------ setup

    def _per_rank_batch(self) -> int:
        cfg, world = self.cfg, self.env.world_size
        if cfg.batch_size % world:
            raise ConfigError(f"--batch-size {cfg.batch_size} is the global batch and must be divisible by the "
                              f"{world} processes; use a multiple of {world}")
        per_rank = cfg.batch_size // world
        if per_rank < cfg.accum_steps:
            raise ConfigError(f"--accum-steps {cfg.accum_steps} exceeds the per-process batch {per_rank}")
        return per_rank

    def _build_model(self) -> tuple[ResNet, nn.Module]:
        """The plain model (checkpoints, evaluation, attacks) and the one that trains (DDP, compiled)."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts them)
        model = build_model(cfg.arch, cfg.model_variant, len(self.data.classes), cfg.width, self.data.mean,
                            self.data.std, cfg.zero_init_residual)
        if cfg.sync_bn and self.env.distributed:
            if self.device.type != "cuda":
                raise ConfigError("--sync-bn needs CUDA devices (torch's SyncBatchNorm has no CPU kernel); "
                                  "drop --sync-bn on CPU (BN statistics are averaged over ranks each epoch anyway)")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(self.device, memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        train_model: nn.Module = model
        if self.env.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            train_model = DistributedDataParallel(model, device_ids=ids)
        if cfg.compile:
            train_model = torch.compile(train_model)
        return model, train_model

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.use_bf16 else nullcontext()

    def _to_device(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        x = batch.x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, batch.y.to(self.device, non_blocking=True)

    # ------------------------------------------------------------------ one optimizer step

    def _adversarial(self, x: torch.Tensor, y: torch.Tensor, chunk: int) -> torch.Tensor:
        """PGD examples against the current weights, attacked in eval mode (see the module docstring)."""
        gen = torch.Generator(device=x.device).manual_seed(_stream_seed(self.cfg.seed, self.step, self.env.rank, chunk))
        self.model.eval()
        try:
            with self._autocast():
                return pgd(self.model, x, y, self.adv, generator=gen)
        finally:
            self.model.train()

    def train_step(self, batch: Batch) -> None:
        """One optimizer step on this rank's batch, split into ``accum_steps`` forward/backward chunks."""
        x, y = self._to_device(batch)
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule.lr(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        chunks = list(zip(x.chunk(self.cfg.accum_steps), y.chunk(self.cfg.accum_steps)))
        for i, (xc, yc) in enumerate(chunks):
            if self.adv is not None:
                xc = self._adversarial(xc, yc, i)
            last = i == len(chunks) - 1
            # Gradients are all-reduced once per step, on the last chunk; earlier chunks only accumulate.
            sync = nullcontext() if last or not self.env.distributed else self.train_model.no_sync()
            with sync:
                with self._autocast():
                    logits = self.train_model(xc)
                    loss = F.cross_entropy(logits.float(), yc, label_smoothing=self.cfg.label_smoothing)
                (loss * (len(yc) / len(y))).backward()  # chunk means weighted into the batch mean
            with torch.no_grad():
                self.partial += torch.stack([loss.detach().double() * len(yc),
                                             (logits.argmax(1) == yc).sum().double(),
                                             torch.tensor(float(len(yc)), dtype=torch.float64, device=self.device)])
        self.optimizer.step()
        self.step += 1

    # ------------------------------------------------------------------ epochs

    def _check(self) -> bool:
        """Agree across ranks on a non-finite loss (raise) and on a stop request (return True). The running
        loss and top-1 sums ride along in the same collective: the progress line shows all ranks' images."""
        sums = torch.cat([torch.tensor([float(not torch.isfinite(self.partial[0])), float(self.stop_requested)],
                                       dtype=torch.float64, device=self.device), self.partial])
        all_reduce_sum(sums, self.env)
        flags, self.running = sums[:2], sums[2:]
        if flags[0] > 0:
            raise TrainingDiverged(
                f"non-finite training loss in epoch {self.epoch + 1} (by optimizer step {self.step}); stopped "
                f"without saving, so {self.run_dir / 'last.pt'} still holds the last good state (epoch {self.epoch}). "
                "Lower --lr, lengthen --warmup-epochs, or check the data for NaN/inf values; then --resume or "
                "--overwrite.")
        self.stopped = bool(flags[1] > 0)
        return self.stopped

    def train_epoch(self, stop_after_steps: int | None = None) -> bool:
        """Run (the rest of) epoch ``self.epoch``; False if it stopped early on request."""
        start = self.step - self.epoch * self.steps_per_epoch  # > 0 when resuming mid-epoch
        loader = self.data.train_batches(self.epoch, self.per_rank_batch, self.env.rank, self.env.world_size, start)
        self.train_model.train()
        tic = time.perf_counter()
        for i, batch in enumerate(loader, start=1):
            self.train_step(batch)
            if stop_after_steps is not None and self.step >= stop_after_steps:
                return False
            if i % self.cfg.log_every == 0 or i == len(loader):
                if self._check():
                    return False
                self._progress(start + i, tic)
        return True

    def _progress(self, position: int, tic: float) -> None:
        if not self.show_progress:
            return
        loss, correct, count = self.running.tolist()  # every rank's images this epoch (see _check)
        rate = count / max(time.perf_counter() - tic, 1e-9)
        # count covers this epoch's steps since tic; the global batch is cfg.batch_size images per step
        eta = (self.steps_per_epoch - position) * self.cfg.batch_size / max(rate, 1e-9)
        self.log(f"epoch {self.epoch + 1}/{self.cfg.epochs} step {position}/{self.steps_per_epoch} "
                 f"loss {loss / max(count, 1):.4f} top-1 {100 * correct / max(count, 1):.2f}% "
                 f"lr {self.schedule.lr(self.step - 1):.4g} {rate:.0f} img/s epoch eta {eta:.0f} s")

    @torch.no_grad()
    def evaluate(self) -> dict[str, dict[str, float]]:
        """Top-1 and mean loss on the test variant and the extra variants, over all ranks' shares."""
        self.model.eval()
        results = {}
        for variant in (self.cfg.test_variant, *self.cfg.extra_variants):
            sums = torch.zeros(3, dtype=torch.float64, device=self.device)
            for batch in self.data.eval_batches(variant, self.cfg.eval_batch_size, self.env.rank, self.env.world_size):
                x, y = self._to_device(batch)
                with self._autocast():
                    logits = self.model(x).float()
                sums += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(),
                                     (logits.argmax(1) == y).sum().double(),
                                     torch.tensor(float(len(y)), dtype=torch.float64, device=self.device)])
            loss, correct, count = all_reduce_sum(sums, self.env).tolist()
            results[variant] = {"top1": correct / max(count, 1), "loss": loss / max(count, 1), "n": int(count)}
        self.model.train()
        return results

    def _epoch_record(self, seconds: float) -> dict[str, Any]:
        average_buffers(self.model, self.env)  # every rank evaluates (and rank 0 saves) the same model
        loss, correct, count = all_reduce_sum(self.partial.clone(), self.env).tolist()
        evals = self.evaluate()
        return {"epoch": self.epoch, "step": self.step, "lr": self.schedule.lr(self.step - 1),
                "train": {"loss": loss / count, "top1": correct / count, "images": int(count),
                          "seconds": seconds, "images_per_s": count / max(seconds, 1e-9)},
                "eval": evals, "time": time.time()}

    # ------------------------------------------------------------------ checkpoints

    def _payload(self, record: dict[str, Any] | None, partial: list[float]) -> dict[str, Any]:
        metrics = {"best_top1": self.best_top1, "partial": partial}
        if record is not None:
            metrics["last"] = record
        return checkpoint_payload(
            self.model, optimizer=self.optimizer.state_dict(),
            scheduler={"name": self.cfg.schedule, "step": self.step, "steps_per_epoch": self.steps_per_epoch},
            epoch=self.epoch, step=self.step, rng=rng_state(),
            config={**self.cfg.to_json(), "config_hash": config_hash(self.cfg)},
            data=self.data.describe(), metrics=metrics)

    def save(self, record: dict[str, Any] | None) -> None:
        """Rank 0 writes last.pt (and best.pt / epoch-NNNN.pt when due); all ranks wait for it."""
        # A mid-epoch stop stores the epoch's running statistics summed over ranks (rank 0 resumes them).
        partial = all_reduce_sum(self.partial.clone(), self.env).tolist()
        is_best = record is not None and record["eval"][self.cfg.test_variant]["top1"] >= self.best_top1
        if is_best:
            self.best_top1 = record["eval"][self.cfg.test_variant]["top1"]
        if self.env.is_main:
            payload = self._payload(record, partial)
            # last.pt goes last: it records best_top1 and is where a resume starts, so after a kill anywhere
            # in between, the resumed run redoes this epoch and writes best.pt / epoch-NNNN.pt again.
            if is_best:
                save_checkpoint(self.run_dir / "best.pt", payload)
            if record is not None and self.cfg.save_every and self.epoch % self.cfg.save_every == 0:
                save_checkpoint(self.run_dir / f"epoch-{self.epoch:04d}.pt", payload)
            keep_previous(self.run_dir / "last.pt", self.run_dir / rundir.PREVIOUS)
            save_checkpoint(self.run_dir / "last.pt", payload)
        barrier(self.env)

    def resume(self, source: str | Path | None = None) -> None:
        """Restore model, optimizer, step/epoch, RNG and the partial epoch statistics from last.pt (or from
        ``source``, a checkpoint of this run such as last.prev.pt or epoch-NNNN.pt)."""
        path = rundir.resume_path(self.run_dir, source)
        payload = self._load_for_resume(path, offer_others=source is None)
        if payload["config"].get("config_hash") != config_hash(self.cfg):
            raise ConfigError(f"{path} was written by another config; --overwrite to start again")
        if payload["scheduler"]["steps_per_epoch"] != self.steps_per_epoch:
            raise ConfigError(f"{self.run_dir}: the data now gives {self.steps_per_epoch} steps per epoch, the run "
                              f"had {payload['scheduler']['steps_per_epoch']}; resume with the same data and world size")
        self.model.load_state_dict(payload["state_dict"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.epoch, self.step = int(payload["epoch"]), int(payload["step"])
        self.best_top1 = float(payload["metrics"]["best_top1"])
        partial = payload["metrics"]["partial"] if self.env.is_main else [0.0, 0.0, 0.0]
        self.partial = torch.tensor(partial, dtype=torch.float64, device=self.device)
        set_rng_state(payload["rng"])
        if self.env.is_main:
            rundir.truncate_metrics(self.run_dir, self.epoch)
        self.log(f"resumed {self.run_dir} at epoch {self.epoch}, step {self.step}")

    def _load_for_resume(self, path: Path, offer_others: bool) -> dict[str, Any]:
        """The checkpoint at ``path``; when it is damaged, the error lists this run's other whole states."""
        try:
            return load_checkpoint(path)
        except CheckpointError as exc:
            others = [n for n in rundir.resume_candidates(self.run_dir) if n != path.name] if offer_others else []
            if not others:
                raise
            raise CheckpointError(f"{exc}\nEarlier states of this run: {', '.join(others)}. Continue from the newest "
                                  f"with `rankshard-train --resume {self.run_dir} --resume-from {others[0]}` "
                                  "(the steps after it are trained again, identically).") from exc

    # ------------------------------------------------------------------ the run

    def fit(self, stop_after_epochs: int | None = None, stop_after_steps: int | None = None) -> list[dict[str, Any]]:
        """Train until ``cfg.epochs``; returns the epoch records written by this call.

        ``stop_after_epochs`` ends this call after that many completed epochs (time-sliced jobs);
        ``stop_after_steps`` (a global optimizer step count) or a stop request (SIGTERM) ends it mid-epoch.
        Either way last.pt holds the exact position and ``resume()`` continues from there.
        """
        records: list[dict[str, Any]] = []
        while self.epoch < self.cfg.epochs:
            if stop_after_epochs is not None and len(records) >= stop_after_epochs:
                self.log(f"stopped after epoch {self.epoch}; continue with --resume {self.run_dir}")
                break
            tic = time.perf_counter()
            if not self.train_epoch(stop_after_steps):
                self._check()  # never save diverged weights
                self.save(None)
                self.log(f"stopped in epoch {self.epoch + 1} at step {self.step}; continue with --resume {self.run_dir}")
                break
            self.epoch += 1
            record = self._epoch_record(time.perf_counter() - tic)
            self.partial.zero_()
            records.append(record)
            self._finish_epoch(record)
        return records

    def _finish_epoch(self, record: dict[str, Any]) -> None:
        if self.env.is_main:
            rundir.append_metrics(self.run_dir, record)
        self.save(record)
        if self.env.is_main:
            rundir.plot_curves(self.run_dir, rundir.read_metrics(self.run_dir), self.schedule.lr, self.steps_per_epoch)
            evals = " ".join(f"{v} {100 * m['top1']:.2f}%" for v, m in record["eval"].items())
            self.log(f"epoch {self.epoch}/{self.cfg.epochs} train loss {record['train']['loss']:.4f} "
                     f"top-1 {100 * record['train']['top1']:.2f}% | test {evals} | "
                     f"{record['train']['images_per_s']:.0f} img/s")

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGUSR1 (cluster preemption) ask for a stop: last.pt is saved at the next check."""
        def handler(signum, frame):
            self.stop_requested = True
        for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", signal.SIGTERM)):
            signal.signal(sig, handler)
