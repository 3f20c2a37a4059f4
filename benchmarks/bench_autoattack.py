"""AutoAttack (standard budgets) cost per image against untargeted PGD-20, same model, points, eps and device.

AutoAttack's cost depends on how many points survive each attack (each attack runs only on points still
robust), so the result records, besides the times, how many images each attack saw, and the pass-count bound:
per image that stays robust to the end, APGD-CE = 101 forward + 100 backward, APGD-T = 9 x that, FAB-T =
9 x (100 forward + backward + 100 forward), Square = 5001 forward passes, against PGD-20's 21 forward + 20
backward. Rounds are interleaved (PGD, AA, PGD, AA...)
so load changes on a shared machine hit both; median and best of each are reported, with their ratio.

    python benchmarks/bench_autoattack.py [--quick] [--rounds 3] [--device cpu|cuda] [--eps 2/255]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from _results import write_result  # noqa: E402

from rankshard.preprocess.sources.synth import labelled_images  # noqa: E402
from rankshard.train.attacks import parse_eps  # noqa: E402
from rankshard.train.autoattack import AttackBudget, expand, run_sequence  # noqa: E402
from rankshard.train.models import build_model  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gens(n: int, seed: int, device: torch.device) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(seed * 100003 + i) for i in range(n)]


def timed(fn, device: torch.device) -> tuple[float, object]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = Path("/proc/cpuinfo")
    names = [ln.split(":", 1)[1].strip() for ln in cpu.read_text().splitlines()
             if ln.startswith("model name")] if cpu.exists() else []
    return names[0] if names else platform.processor()


def _attacked_counts(model, x, y, eps, budget, device) -> dict[str, int]:
    """Images each AutoAttack member attacked (robust to every earlier one), from one extra untimed run."""
    counts, robust = {}, None
    for name in expand(["aa"], "linf"):
        with torch.no_grad():
            clean = model(x).argmax(1) == y
        counts[name] = int((clean if robust is None else robust).sum())
        res = run_sequence(model, x, y, [name], "linf", eps, {name: _gens(len(x), 1, device)}, budget, robust=robust)
        robust = res.robust
    counts["robust_at_end"] = int(robust.sum())
    return counts


def run(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    model = build_model(args.arch, "cifar", 10, args.width).to(device).eval()
    images, labels = labelled_images(max(1, args.batch // 10 + 1), size=(32, 32), seed=0)
    x = (torch.from_numpy(images[:args.batch]).permute(0, 3, 1, 2).float() / 255).to(device)
    with torch.no_grad():
        y = model(x).argmax(1)  # labels = predictions: every image starts clean-correct (worst case for AA's cost)
    eps = parse_eps(args.eps)
    budget = AttackBudget(20, 10, 9, 100, 10) if args.quick else AttackBudget()
    pgd_t, aa_t = [], []
    for r in range(args.rounds):
        t, _ = timed(lambda: run_sequence(model, x, y, ["pgd"], "linf", eps, {"pgd": _gens(len(x), r, device)}, budget), device)
        pgd_t.append(t)
        names = expand(["aa"], "linf")
        t, res = timed(lambda: run_sequence(model, x, y, names, "linf", eps, {n: _gens(len(x), r, device) for n in names},
                                            budget), device)
        aa_t.append(t)
        print(f"round {r}: PGD-20 {pgd_t[-1]:.2f} s, AutoAttack {aa_t[-1]:.2f} s, AA robust {int(res.robust.sum())}/{len(x)}")
    n = len(x)
    return {
        "benchmark": "autoattack-vs-pgd20", "quick": args.quick, "eps": eps, "norm": "linf",
        "budget": vars(budget), "aa_sequence": expand(["aa"], "linf"),
        "images": n, "rounds": args.rounds,
        "pgd20_s_per_image": {"median": statistics.median(pgd_t) / n, "best": min(pgd_t) / n, "all": [t / n for t in pgd_t]},
        "aa_s_per_image": {"median": statistics.median(aa_t) / n, "best": min(aa_t) / n, "all": [t / n for t in aa_t]},
        "ratio_aa_over_pgd20": {"median": statistics.median(aa_t) / statistics.median(pgd_t), "best": min(aa_t) / min(pgd_t)},
        "images_attacked": _attacked_counts(model, x, y, eps, budget, device),
        "pass_bound_per_robust_image": {"pgd20": "21 fwd + 20 bwd", "apgd-ce": f"{budget.apgd_steps + 1} fwd + "
                                        f"{budget.apgd_steps} bwd", "apgd-t": f"{budget.n_target_classes} x that",
                                        "fab-t": f"{budget.n_target_classes} x {budget.fab_steps} x (2 fwd + 1 bwd)",
                                        "square": f"{budget.square_queries + 1} fwd"},
        "provenance": {"device": str(device), "hardware": hardware(device), "torch": torch.__version__,
                       "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
                       "cpu_count": os.cpu_count(), "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
                       "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "model": {"arch": args.arch, "width": args.width, "variant": "cifar", "size": 32}},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Tiny budgets (APGD 10 steps, Square 100 queries).")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default=None)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--eps", default="2/255")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier on shared CPUs).")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args)
    print(f"AutoAttack / PGD-20 per image: median {result['ratio_aa_over_pgd20']['median']:.1f}x, "
          f"best {result['ratio_aa_over_pgd20']['best']:.1f}x; attacked {result['images_attacked']}")
    device = result["provenance"]["device"].split(":")[0]
    write_result(result, f"autoattack-{device}{'-quick' if args.quick else ''}", args.out)


if __name__ == "__main__":
    main()
