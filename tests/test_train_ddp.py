"""DDP with 2 CPU processes (gloo): equal steps, ranks agree on weights, checkpoint and metrics from rank 0."""
import os
import socket

import torch
import torch.multiprocessing as mp

from rankshard.train import rundir
from rankshard.train.checkpoint import load_checkpoint
from rankshard.train.config import from_preset
from rankshard.train.data import TensorData
from rankshard.train.dist import init_distributed, shutdown


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_weights_worker(rank: int, world: int, port: int, run_dir: str, out: str) -> None:
    """Like _worker, but every rank saves its own final weights so the test can compare them."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from rankshard.train.trainer import Trainer

    cfg = from_preset("cifar10-fast", {"arch": "resnet18", "width": "8", "epochs": "2", "batch_size": "40",
                                       "lr": "0.2", "warmup_epochs": "0.5", "log_every": "2", "device": "cpu"})
    env = init_distributed("cpu")
    try:
        if env.is_main:
            rundir.prepare(run_dir, cfg)
        data = TensorData.synthetic(per_class=20, size=16, test_per_class=8)
        lines = []
        trainer = Trainer(cfg, run_dir, data, env, log=lines.append)
        records = trainer.fit()
        torch.save({"state": trainer.model.state_dict(), "steps": trainer.step, "records": records,
                    "lines": lines}, os.path.join(out, f"rank-{rank}.pt"))
    finally:
        shutdown(env)


def test_two_cpu_processes_train_in_lockstep(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    mp.spawn(_rank_weights_worker, args=(2, _free_port(), str(run_dir), str(out)), nprocs=2, join=True)
    r0, r1 = (torch.load(out / f"rank-{r}.pt", weights_only=False) for r in range(2))
    # 200 images, global batch 40 -> 5 steps per epoch on both ranks (20 images each per step)
    assert r0["steps"] == r1["steps"] == 10
    for key in r0["state"]:
        assert torch.equal(r0["state"][key], r1["state"][key]), key  # all-reduced gradients; BN statistics averaged each epoch
    # metrics are reduced over ranks, so both ranks report the same numbers (timings aside)
    same = [(r["eval"], r["train"]["loss"], r["train"]["top1"], r["lr"]) for r in r0["records"]]
    assert same == [(r["eval"], r["train"]["loss"], r["train"]["top1"], r["lr"]) for r in r1["records"]]
    assert r0["records"][-1]["train"]["images"] == 200 and r0["records"][-1]["eval"]["full"]["n"] == 80
    # the progress line at an epoch's last step covers every rank's images: it is the epoch's reduced record
    for rec in r0["records"]:
        last = next(ln for ln in r0["lines"] if ln.startswith(f"epoch {rec['epoch']}/2 step 5/5 "))
        assert f"loss {rec['train']['loss']:.4f} top-1 {100 * rec['train']['top1']:.2f}%" in last, last
    saved = load_checkpoint(run_dir / "last.pt")
    assert saved["step"] == 10 and [r["epoch"] for r in rundir.read_metrics(run_dir)] == [1, 2]
