"""The summary printed at the end of a materialization run."""
from __future__ import annotations


def summary_rows(result: dict) -> list[tuple]:
    rows = []
    for name, m in result["manifests"].items():
        size = sum(s["bytes"] for s in m["shards"]) / 1e6
        energy = sum(m["quantization"]["energy_mean"]) / max(len(m["quantization"]["energy_mean"]), 1)
        rows.append((name, len(m["shards"]), m["num_samples"], f"{size:,.1f}", f"{energy:.4f}",
                     f"{m['quantization']['clip_fraction_mean']:.4f}", f"{m['quantization']['leak_mean']:.2e}"))
    return rows


def print_summary(result: dict) -> None:
    """A table per variant plus where the time went, so users see the bottleneck."""
    layout, stats = result["layout"], result["stats"]
    header = ("variant", "shards", "samples", "MB", "energy", "clipped", "leak")
    rows = [header] + summary_rows(result)
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    print(f"\n{layout.split_dir}")
    for r in rows:
        print("  " + "  ".join(str(v).rjust(w) for v, w in zip(r, widths)))
    svd = next(iter(result["manifests"].values()))["svd"]
    print(f"  {stats['images']} images written, {stats['shards_written']} shards "
          f"({stats['shards_skipped']} already done) in {stats['wall']:.1f} s = {stats['images_per_s'] or 0:,.0f} img/s")
    print(f"  time: read {stats['read']:.1f} s, svd+quantize {stats['svd']:.1f} s ({svd['backend']} on "
          f"{svd['device']}), encode+write {stats['encode_write']:.1f} s (summed over workers)")
