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
    where = result.get("where") or layout.split_dir  # object storage: the URL, not the staging folder
    if result["manifests"] is None:
        print(f"\n{where}: rank {stats['rank']}/{stats['world']} wrote its shards; other ranks are "
              "still writing theirs, and the last one to finish writes the manifests")
    else:
        header = ("variant", "shards", "samples", "MB", "energy", "clipped", "leak")
        rows = [header] + summary_rows(result)
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
        print(f"\n{where}")
        for r in rows:
            print("  " + "  ".join(str(v).rjust(w) for v, w in zip(r, widths)))
        errors = next(iter(result["manifests"].values()))["errors"]
        if errors:
            print(f"  {len(errors)} inputs skipped (listed in manifest.json 'errors'), e.g. "
                  f"{errors[0]['source']}: {errors[0]['reason']}")
    print(f"  {stats['images']} images written, {stats['shards_written']} shards "
          f"({stats['shards_skipped']} already done) in {stats['wall']:.1f} s = {stats['images_per_s'] or 0:,.0f} img/s")
    # Stage seconds are summed over whichever processes ran the stage (workers, and this one where it makes
    # shards too, or runs alone with --workers 0); the waits are this process's own.
    print(f"  time, summed over the processes that ran each stage: read/decode {stats.get('decode', 0):.1f} s, "
          f"svd+quantize {stats['svd']:.1f} s, encode+write {stats['encode_write']:.1f} s; the main process spent "
          f"{stats['read']:.1f} s getting decoded images (decoding them, or waiting for workers) and "
          f"{stats.get('write_wait', 0):.1f} s waiting for writers")
    rss = stats.get("peak_rss_mb") or {}
    if rss:
        worker = "no workers" if rss.get("worker") is None else f"largest worker {rss['worker']:,.0f} MB"
        print(f"  peak RSS: main {rss['main']:,.0f} MB, {worker}")
