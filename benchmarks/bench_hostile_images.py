"""Peak memory of a decode worker on hostile images (issue 12, item 2), against a normal JPEG as baseline.

Each file is decoded in a fresh process exactly as a pipeline worker does it (``DecodeJob.run``: read
with the file-size cap, size rules, decode, resize, crop) and that process reports its peak RSS
(``VmHWM``, which starts afresh at exec; ``ru_maxrss`` would carry over this script's own peak) after importing (the baseline every worker pays) and after the job. The hostile files
must come back as skipped inputs with their reason, and their peak must stay within ``--bound-mb`` of the
import baseline: the rules refuse them before a pixel is decoded.

    python benchmarks/bench_hostile_images.py            # writes benchmarks/results/hostile_images-cpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_result  # noqa: E402

from rankshard.preprocess.sources.synth import class_images  # noqa: E402
from rankshard.preprocess.sources.synthtree import hostile_files, jpeg_bytes  # noqa: E402

# Runs in the child: one DecodeJob over one file, then its own peak RSS in MB.
CHILD = """
import json, re, sys
from rankshard.preprocess.sources.images import Geometry
from rankshard.preprocess.sources.listing import DecodeJob
rss = lambda: int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) / 1024
base = rss()
job = DecodeJob([(sys.argv[1], 0, -1)], [0], [0], ["x"], Geometry(256, 224))
loaded = job.run()
print(json.dumps({"import_mb": round(base, 1), "peak_mb": round(rss(), 1), "kept": int(loaded.keep.sum()),
                  "reason": loaded.errors[0]["reason"] if loaded.errors else None}))
"""


def measure(path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        return {"error": f"exit {out.returncode}: {out.stderr[-400:]}"}
    return json.loads(out.stdout)


def _upscaled(image, size):
    from PIL import Image
    import numpy as np

    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


def inputs(folder: Path) -> dict[str, tuple[Path, str | None]]:
    """name -> (file, expected reason fragment or None for 'must decode')."""
    files = {"normal_500x375.jpg": (jpeg_bytes(class_images(1, 1, (375, 500))[0]), None),
             "large_4000x3000.jpg": (jpeg_bytes(_upscaled(class_images(2, 1, (300, 400))[0], (4000, 3000))), None),
             **hostile_files()}
    out = {}
    for name, (data, reason) in files.items():
        (folder / name).write_bytes(data)
        out[name] = (folder / name, reason)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bound-mb", type=float, default=16.0,
                        help="allowed growth over the import baseline for refused files, MB")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows, ok = {}, True
    with tempfile.TemporaryDirectory() as tmp:
        for name, (path, reason) in inputs(Path(tmp)).items():
            r = {**measure(path), "file_bytes": path.stat().st_size, "expected": reason or "decoded"}
            r["growth_mb"] = round(r.get("peak_mb", 0) - r.get("import_mb", 0), 1)
            r["pass"] = ("error" not in r and (r["kept"] == 1 if reason is None else
                         reason in (r["reason"] or "") and r["growth_mb"] <= args.bound_mb))
            ok &= r["pass"]
            rows[name] = r
            print(f"{name:26s} {r['file_bytes']:>10,} B  import {r.get('import_mb', '?'):>7} MB  peak "
                  f"{r.get('peak_mb', '?'):>7} MB  (+{r['growth_mb']:>6} MB)  {r.get('reason') or 'decoded'}")
    result = {"benchmark": "hostile_images", "bound_mb_over_import": args.bound_mb, "pass": ok, "rows": rows,
              "python": platform.python_version(), "machine": platform.machine(),
              "note": "peak RSS of a fresh process running one DecodeJob; Geometry(256, 224), default --max-pixels"}
    write_result(result, "hostile_images-cpu", args.out)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
