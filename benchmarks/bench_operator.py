"""Zero-padded operator of every ResNet-50 conv: matrix-free block Lanczos against the dense matrix.

    python benchmarks/bench_operator.py [--quick] [--input-size 224] [--top-k 10] [--dense-size 32] [--device cuda]

Matrix-free: ``rankshard.evaluate.weights.operator.top_singular`` (conv2d + conv_transpose2d, float64).
Dense baseline: the operator's matrix built by applying the same conv to the identity basis, then
``torch.linalg.svdvals`` (float64), only on layers whose matrix has at most ``--dense-max-entries`` entries.
At 224x224 no ResNet-50 conv fits (the smallest has 25088 x 25088 entries, 5 GB), so the comparison runs at
``--dense-size`` (both methods, >= 3 interleaved rounds, median and best ratio). Also recorded, at
``--input-size``: per-layer sigma_max of the zero-padded and the circular operator (their gap), and the
total matrix-free time for the network. ``--quick``: input 32, top-3, dense at 16. Writes
benchmarks/results/operator-<device>[-quick].json.

Single-threaded BLAS/OpenMP by default (as bench_weights.py): on the shared 2-vCPU machine two threads made
both methods 6-80x slower (conv1 at 16x16: Lanczos 18.9 s vs 0.24 s, dense 23.5 s vs 1.4 s).
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._results import cpu_model, write_result  # noqa: E402
from rankshard.evaluate.weights.operator import (ConvGeometry, ConvOperator, LanczosConfig, block_size,  # noqa: E402
                                                 top_singular)
from rankshard.evaluate.weights.spectra import WeightsConfig, conv_operator_svdvals, discover_layers  # noqa: E402


def conv_operators(model, size: int, device: str = "cpu") -> list[tuple[str, ConvOperator, object]]:
    """(name, zero-padded operator, layer info) of every conv at the resolution it sees."""
    infos = discover_layers(model, WeightsConfig(input_size=(size, size)))
    return [(i.name, ConvOperator(i.weight, ConvGeometry(i.weight.shape[1] * i.groups, i.input_hw, i.stride,
                                                         i.padding, i.dilation, i.groups), device=device), i)
            for i in infos if i.kind == "conv"]


def dense_svdvals(op: ConvOperator) -> torch.Tensor:
    """Baseline: the explicit matrix (conv of every basis image) and all its singular values."""
    eye = torch.eye(op.n_in, dtype=torch.float64, device=op.weight.device)
    return torch.linalg.svdvals(op.matvec(eye).T)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def network_pass(model, size: int, k: int, cfg: LanczosConfig, device: str) -> dict:
    """Top-k of every conv at ``size``: per-layer sigma_max (zero vs circular) and times."""
    layers, total = [], 0.0
    for name, op, info in conv_operators(model, size, device):
        top, sec = timed(lambda: top_singular(op, k, cfg))
        circ = float(conv_operator_svdvals(info.weight, info.input_hw, info.stride, info.dilation, info.groups)[0])
        zero = float(top.s[0])
        layers.append({"name": name, "shape": list(info.weight.shape), "input_hw": list(info.input_hw),
                       "stride": list(info.stride), "zero_sigma_max": zero, "circular_sigma_max": circ,
                       "circular_over_zero": circ / zero, "seconds": sec, "converged": top.converged,
                       "gram_products": top.gram_products, "top_k": top.s.tolist(),
                       "block": block_size(k, cfg, op.structural_multiplicity)})
        total += sec
        print(f"{name:28s} {info.input_hw} zero {zero:.5f} circ {circ:.5f} ({circ / zero - 1:+.2%}) {sec:.1f}s "
              f"{top.gram_products} products", flush=True)
    return {"layers": layers, "total_seconds": total}


def dense_comparison(model, size: int, k: int, cfg: LanczosConfig, max_entries: float, rounds: int,
                     device: str) -> dict:
    """Interleaved rounds of matrix-free vs dense on every conv whose matrix fits at ``size``."""
    fits = [(n, op) for n, op, _ in conv_operators(model, size, device) if op.n_in * op.n_out <= max_entries]
    per = {n: {"lanczos": [], "dense": [], "max_rel_err": 0.0} for n, _ in fits}
    for _ in range(rounds):
        for name, op in fits:
            top, t_l = timed(lambda: top_singular(op, k, cfg))
            ref, t_d = timed(lambda: dense_svdvals(op))
            rec = per[name]
            rec["lanczos"].append(t_l)
            rec["dense"].append(t_d)
            err = float(((top.s - ref[:k]).abs() / ref[0]).max())
            rec["max_rel_err"] = max(rec["max_rel_err"], err)
            print(f"  dense {name:28s} {op.n_out}x{op.n_in} lanczos {t_l:.2f}s dense {t_d:.2f}s err {err:.1e}",
                  flush=True)
    ratios = [d / max(l_, 1e-9) for r in per.values() for d, l_ in zip(r["dense"], r["lanczos"])]
    return {"size": size, "layers": per, "n_layers": len(fits), "rounds": rounds,
            "ratio_dense_over_lanczos_median": statistics.median(ratios) if ratios else None,
            "ratio_best": max(ratios) if ratios else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--dense-size", type=int, default=32)
    ap.add_argument("--dense-max-entries", type=float, default=3e7)  # 240 MB of float64
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tol", type=float, default=1e-10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.quick:
        args.input_size, args.top_k, args.dense_size = 32, 3, 16
    from rankshard.train.models import build_model
    torch.manual_seed(0)
    model = build_model("resnet50", "imagenet", 1000).eval()  # random init: shapes decide the cost
    cfg = LanczosConfig(tol=args.tol)
    dense = dense_comparison(model, args.dense_size, args.top_k, cfg, args.dense_max_entries, args.rounds,
                             args.device)
    print(f"dense vs matrix-free at {args.dense_size}: {dense['n_layers']} layers, "
          f"median ratio {dense['ratio_dense_over_lanczos_median']}", flush=True)
    network = network_pass(model, args.input_size, args.top_k, cfg, args.device)
    result = {"benchmark": "operator", "quick": args.quick, "input_size": args.input_size, "top_k": args.top_k,
              "tol": args.tol, "dense": dense, "network": network,
              "provenance": {"cpu": cpu_model(), "cores": os.cpu_count(),
                             "load_avg": os.getloadavg(), "torch": torch.__version__,
                             "threads": torch.get_num_threads(), "python": platform.python_version(),
                             "model": "rankshard.train.models.build_model('resnet50', 'imagenet', 1000)",
                             "device": (torch.cuda.get_device_name(0) if args.device.startswith("cuda")
                                        else "cpu"),
                             "lanczos": {"guard": cfg.guard, "block": cfg.block, "basis": cfg.basis}}}
    write_result(result, f"operator-{args.device.split(':')[0]}" + ("-quick" if args.quick else ""), args.out)


if __name__ == "__main__":
    main()
