"""Soak: materialize a few thousand images while killing a random worker or the main process, N rounds.

Every round must end in either a complete output byte-identical to an uninterrupted reference, or a clear
error (a killed worker: non-zero exit within 10 s naming it; a killed main process: no orphaned workers)
followed by a resume that completes byte-identical. Source: an ImageFolder tree of synthetic JPEGs
(decoded in the workers, so a kill can land in decoding or in writing).

    python benchmarks/soak_preprocess.py --rounds 8 --images 2000     # -> benchmarks/results/soak_preprocess-cpu.json
"""
from __future__ import annotations

import argparse
import hashlib
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_result  # noqa: E402

from rankshard.preprocess.sources.synthtree import write_train_tree  # noqa: E402
from rankshard.preprocess.workers import alive, worker_pids  # noqa: E402


def command(src: Path, out: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "rankshard.preprocess", "folder", "--source", str(src), "--out", str(out),
            "--ranks", "2,5", "--high", "3", "--resize", "32", "--crop", "32", "--shard-size", "100",
            "--batch-size", "50", "--workers", str(workers), "--backend", "gram64", "--quiet"]


def tar_hashes(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*.tar"))}


def kill_at(proc: subprocess.Popen, victim: str, delay: float, rng: random.Random) -> dict:
    """Sleep ``delay`` s, then SIGKILL a random worker or the main process; what was killed, and when."""
    time.sleep(delay)
    workers = worker_pids(proc.pid)
    if proc.poll() is not None:
        return {"killed": "nothing (finished first)", "workers": []}
    if victim == "worker" and workers:
        pid = rng.choice(workers)
        os.kill(pid, signal.SIGKILL)
        return {"killed": f"worker {pid}", "workers": workers}
    proc.kill()
    return {"killed": f"main {proc.pid}", "workers": workers}


def one_round(i: int, args, src: Path, root: Path, reference: dict, ref_seconds: float, rng: random.Random) -> dict:
    out = root / f"round-{i}"
    victim = rng.choice(["worker", "main"])
    delay = rng.uniform(0.3, 0.9 * ref_seconds)
    proc = subprocess.Popen(command(src, out, args.workers), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    row = {"round": i, "victim": victim, "at_s": round(delay, 2), **kill_at(proc, victim, delay, rng)}
    t0 = time.monotonic()
    stderr = proc.communicate(timeout=120)[1]
    row["exit_s"], row["exit_status"] = round(time.monotonic() - t0, 2), proc.returncode
    row["message"] = next((line for line in stderr.splitlines() if line.startswith("error:")), "")[:160]
    time.sleep(0.5)  # workers of a killed main process get SIGKILL from the kernel; let them be reaped
    row["orphans"] = [p for p in row.pop("workers") if alive(p)]
    if proc.returncode != 0:
        resumed = subprocess.run(command(src, out, args.workers), capture_output=True, text=True, timeout=600)
        row["resume_status"] = resumed.returncode
    row["identical"] = tar_hashes(out) == reference
    clear = row["killed"].startswith("main") or ("worker process" in row["message"] and row["exit_s"] < 10)
    row["ok"] = row["identical"] and not row["orphans"] and (proc.returncode == 0 or clear)
    shutil.rmtree(out, ignore_errors=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--images", type=int, default=2000, help="total images (5 classes, 32x32 JPEGs)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_train_tree(root / "src", classes=5, per_class=args.images // 5, size=(32, 32), odd=False)
        t0 = time.monotonic()
        subprocess.run(command(root / "src", root / "ref", args.workers), check=True)
        ref_seconds = time.monotonic() - t0
        reference = tar_hashes(root / "ref")
        print(f"reference: {len(reference)} shards in {ref_seconds:.1f} s")
        print(f"{'round':>5} {'killed':>18} {'at s':>6} {'exit s':>6} {'status':>6} {'resume':>6} identical  message")
        rows = []
        for i in range(args.rounds):
            r = one_round(i, args, root / "src", root, reference, ref_seconds, rng)
            rows.append(r)
            print(f"{i:>5} {r['killed']:>18} {r['at_s']:>6} {r['exit_s']:>6} {r['exit_status']:>6} "
                  f"{str(r.get('resume_status', '-')):>6} {str(r['identical']):>9}  {r['message'][:70]}")
    ok = all(r["ok"] for r in rows)
    print(f"{sum(r['ok'] for r in rows)}/{len(rows)} rounds ok")
    write_result({"benchmark": "soak_preprocess", "images": args.images, "workers": args.workers, "seed": args.seed,
                  "reference_seconds": round(ref_seconds, 2), "shards": len(reference), "pass": ok, "rounds": rows,
                  "python": platform.python_version(), "cpus": os.cpu_count()}, "soak_preprocess-cpu", args.out)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
