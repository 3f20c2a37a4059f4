"""The files beside each manifest: a wids shard index and a Hugging Face dataset card with class names."""
from __future__ import annotations

import json
import shutil

import pytest

from loaders_shards import built_root

VARIANTS = ("train/full", "train/rank-005", "train/high-002", "train/factors-006", "train/spectra", "test/rank-003")


@pytest.mark.parametrize("variant", VARIANTS)
def test_wids_index_lists_every_shard_as_wids_reads_it(variant):
    wds = pytest.importorskip("webdataset")
    folder = built_root() / "cifar10" / variant
    index, manifest = (json.loads((folder / n).read_text()) for n in ("wids.json", "manifest.json"))
    # wids' loader (wids_specs) requires this kind and a shardlist of {url, nsamples}; urls are relative to the index
    assert index["__kind__"] == "wids-shard-index-v1" and index["wids_version"] == 1
    assert [s["url"] for s in index["shardlist"]] == [s["name"] for s in manifest["shards"]]
    for entry in index["shardlist"]:
        shard = folder / entry["url"]
        assert entry["filesize"] == shard.stat().st_size
        assert entry["nsamples"] == sum(1 for _ in wds.WebDataset(str(shard), shardshuffle=False))


def test_hf_datasets_reads_the_card_and_shows_class_names(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "rank-005"
    shutil.copytree(built_root() / "cifar10" / "train" / "rank-005", folder)
    ds = datasets.load_dataset(str(folder), split="train", cache_dir=str(tmp_path / "hf"))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert ds.features["cls"].names == manifest["classes"]
    assert len(ds) == manifest["num_samples"]
    first = ds[0]
    assert ds.features["cls"].int2str(first["cls"]) == first["json"]["class_name"]
    assert first["png"].size == tuple(manifest["image_size"][::-1])


def test_card_documents_the_array_layout_of_each_encoding():
    root = built_root() / "cifar10"
    assert "H, W, C" in (root / "test/rank-003/README.md").read_text()         # npy: channels last
    assert "U [C, H, k]" in (root / "train/factors-006/README.md").read_text()  # factors: channels first
    assert "HWC" in (root / "train/rank-005/README.md").read_text()
