"""--limit N means the first N samples of the manifest order, also where materialization skipped an input
(its key is then missing: keys are output positions fixed before decoding)."""
from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner
from PIL import Image

from rankshard.evaluate.data import shard_data
from rankshard.preprocess.cli import main as preprocess


def test_limit_counts_samples_not_keys_when_an_input_was_skipped(tmp_path):
    rng = np.random.default_rng(0)
    for c in range(2):
        for i in range(4):
            path = tmp_path / "src" / f"c{c}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((rng.random((16, 16, 3)) * 255).astype("uint8")).save(path)
    (tmp_path / "src" / "c0" / "1.png").write_bytes(b"not an image")  # skipped: key 00000001 is never written
    res = CliRunner().invoke(preprocess, ["folder", "--source", str(tmp_path / "src"), "--name", "toy", "--split",
                                          "test", "--out", str(tmp_path / "shards"), "--resize", "16", "--crop", "16",
                                          "--ranks", "2", "--workers", "0", "--quiet", "--backend", "torch"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "shards" / "toy" / "test" / "full" / "manifest.json").read_text())
    assert [e["index"] for e in manifest["errors"]] == [1] and manifest["num_samples"] == 7
    everything = shard_data(tmp_path / "shards", "toy", "test", "full", batch_size=3, workers=0)
    in_order = [k for b in everything.batches(0, 1) for k in b.keys]
    assert in_order[:3] == ["00000000", "00000002", "00000003"]
    for limit in (1, 3, 5, 7, 50):
        data = shard_data(tmp_path / "shards", "toy", "test", "full", batch_size=3, workers=0, limit=limit)
        for world in (1, 2, 3):  # every rank's part together: the first `limit` samples, each once
            keys = sorted(k for r in range(world) for b in data.batches(r, world) for k in b.keys)
            assert keys == in_order[:min(limit, 7)] and data.num_samples == len(keys)
            # each rank gets what its progress bar counts to (they all went to rank 0: its bar read 21/11)
            shares = [sum(len(b.keys) for b in data.batches(r, world)) for r in range(world)]
            assert shares == [data.samples_of(r, world) for r in range(world)]
