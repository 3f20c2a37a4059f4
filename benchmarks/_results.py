"""Where every benchmark writes its JSON (imported by the scripts beside it)."""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(result: dict, name: str, out: str | Path | None = None) -> Path:
    """Write ``result`` to ``out`` or ``benchmarks/results/<name>.json``, print and return the path."""
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path
