"""Files beside each ``manifest.json`` that other tools read: a wids shard index and a Hugging Face card.

* ``wids.json``: webdataset's indexed-dataset format (``__kind__: wids-shard-index-v1``, a ``shardlist`` of
  ``{url, nsamples, filesize}``; urls relative to the index, so the folder can be copied or served anywhere).
* ``README.md``: a ``datasets`` dataset card whose YAML header declares ``configs`` (the shards as the
  split's data files) and ``dataset_info.features``, where ``cls`` is a ``ClassLabel`` with the class names:
  ``load_dataset("<folder or repo>")`` then shows names instead of bare integers. The body documents the
  array layout of the variant's encoding.

The YAML header is written as JSON values (YAML is a superset of JSON), so nothing here needs PyYAML or
``datasets`` at materialization time.
"""
from __future__ import annotations

import json

WIDS_INDEX, CARD = "wids.json", "README.md"

# member extension -> (HF feature, what it holds); one table per encoding (SPEC "Shards")
_META = [("json", {"struct": [
    {"name": "class_name", "dtype": "string"}, {"name": "clip_fraction", "dtype": "float64"},
    {"name": "energy", "list": "float64"}, {"name": "height", "dtype": "int64"}, {"name": "index", "dtype": "int64"},
    {"name": "label", "dtype": "int64"}, {"name": "mode", "dtype": "string"}, {"name": "rank", "dtype": "int64"},
    {"name": "source", "dtype": "string"}, {"name": "width", "dtype": "int64"}]})]
LAYOUTS = {
    "png": [("png", "uint8 RGB image, H x W x C (HWC), round(255 * clip(x_k, 0, 1))")],
    "npy": [("npy", "float16 array [H, W, C] (HWC, channels last, like the PNG), values unclipped (high-rank "
                    "images are negative in places)")],
    "raw": [("npy", "uint8 array [H, W, C] (HWC): the PNG's pixels, uncompressed")],
    "factors": [("u.npy", "float16 U [C, H, k] (channels first)"), ("s.npy", "float16 s [C, k]"),
                ("v.npy", "float16 V [C, W, k]; x_k[c] = U[c] @ diag(s[c]) @ V[c].T gives [C, H, W]")],
    "spectra": [("s.npy", "float32 singular values [C, min(H, W)] (channels first)")],
}


def wids_index(manifest: dict) -> dict:
    """The wids shard index of one variant (its shards, in manifest order)."""
    return {"__kind__": "wids-shard-index-v1", "wids_version": 1,
            "name": f"{manifest['dataset']}/{manifest['split']}/{manifest['variant']}",
            "shardlist": [{"url": s["name"], "nsamples": s["num_samples"], "filesize": s["bytes"]}
                          for s in manifest["shards"]]}


def _features(manifest: dict) -> list[dict]:
    names = {str(i): name for i, name in enumerate(manifest["classes"])}
    image = ([{"name": "png", "dtype": "image"}] if manifest["encoding"] == "png" else [])
    return ([{"name": "__key__", "dtype": "string"}, {"name": "__url__", "dtype": "string"},
             {"name": "cls", "dtype": {"class_label": {"names": names}}}]
            + [{"name": n, **f} for n, f in _META] + image)


def dataset_card(manifest: dict) -> str:
    """README.md: YAML header for ``datasets`` (configs + features with ClassLabel names), then the layout."""
    header = {"configs": [{"config_name": "default",
                           "data_files": [{"split": manifest["split"], "path": "*.tar"}]}]}
    if manifest["encoding"] == "png":  # npy members decode to nested lists whose features datasets infers itself
        header["dataset_info"] = {"features": _features(manifest)}
    yaml = "\n".join(f"{k}: {json.dumps(v)}" for k, v in header.items())
    rows = "\n".join(f"| `KEY.{ext}` | {text} |" for ext, text in LAYOUTS[manifest["encoding"]])
    rank = "" if manifest["rank"] is None else f", rank {manifest['rank']}"
    return f"""---
{yaml}
---
# {manifest['dataset']} / {manifest['split']} / {manifest['variant']}

Materialized by rankshard ({manifest['mode']}{rank}; {manifest['num_samples']} samples in
{len(manifest['shards'])} WebDataset shards). `manifest.json` holds sizes, sha256 sums and the configuration;
`{WIDS_INDEX}` is a wids shard index.

| member | content |
|---|---|
{rows}
| `KEY.cls` | ASCII class index (see `classes` in manifest.json) |
| `KEY.json` | index, source, label, class_name, rank, mode, height, width, energy, clip_fraction |

Classes: {", ".join(f"{i} {n}" for i, n in enumerate(manifest["classes"]))}.
"""


def ecosystem_files(manifest: dict) -> dict[str, bytes]:
    """``{file name: bytes}`` to write beside the manifest (deterministic: no times, no paths)."""
    return {WIDS_INDEX: (json.dumps(wids_index(manifest), indent=2) + "\n").encode(),
            CARD: dataset_card(manifest).encode()}
