"""Bad shards and bad folders: raise naming shard and key, or skip and count; refuse broken manifests."""
import json
import shutil

import pytest

from rankshard.loaders import (LoaderConfig, LoaderError, LoaderWarning, ShardReadError, eval_loader, open_variant,
                     train_loader)
from loaders_shards import PNG_SAMPLES, built_root, copy_variant
from rankshard.preprocess.format.tarindex import scan_shard


def _corrupt_png(folder, shard_index=2, sample=3):
    """Flip bytes inside one sample's PNG data (same file size): returns (shard path, key)."""
    path = folder / f"train-{shard_index:06d}.tar"
    index = scan_shard(str(path))
    offset, size = index.members[sample]["png"]
    data = bytearray(path.read_bytes())
    data[offset + size // 2: offset + size // 2 + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))
    return path, index.keys[sample]


def test_corrupt_sample_raises_naming_shard_and_key(tmp_path):
    folder = copy_variant(tmp_path)
    path, key = _corrupt_png(folder)
    info = open_variant(folder, verify_shards=False)  # read-time detection: the sha256 check would stop it first
    with pytest.raises(ShardReadError) as err:
        list(eval_loader(info, LoaderConfig(batch_size=32, workers=0)))
    assert str(path) in str(err.value) and f"sample {key}" in str(err.value) and "on_error='skip'" in str(err.value)


def test_corrupt_sample_raises_through_workers_as_the_same_type(tmp_path):
    folder = copy_variant(tmp_path)
    path, key = _corrupt_png(folder)
    with pytest.raises(ShardReadError, match=f"sample {key}"):
        list(eval_loader(open_variant(folder, verify_shards=False), LoaderConfig(batch_size=32, workers=2)))


def _flip(path, offset, new: bytes):
    data = bytearray(path.read_bytes())
    data[offset:offset + len(new)] = new
    path.write_bytes(bytes(data))


def test_sha256_check_finds_the_corruption_up_front_by_default(tmp_path):
    folder = copy_variant(tmp_path)
    path, _ = _corrupt_png(folder)
    with pytest.raises(LoaderError, match="differs from manifest.json") as err:
        open_variant(folder)
    assert str(path) in str(err.value) and "--no-verify-shards" in str(err.value)


def test_a_flipped_npy_byte_in_a_high_rank_shard_is_caught(tmp_path):
    folder = copy_variant(tmp_path, variant="high-002")
    path = folder / "train-000003.tar"
    offset, size = scan_shard(str(path)).members[5]["npy"]
    _flip(path, offset + size - 2, b"\x7b")  # a float16 payload byte: decodes fine, value silently wrong
    with pytest.raises(LoaderError, match=f"{path.name}: sha256"):
        open_variant(folder)


def test_a_zeroed_manifest_hash_is_caught(tmp_path):
    folder = copy_variant(tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][4]["sha256"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LoaderError, match="train-000004.tar: sha256"):
        open_variant(folder)



@pytest.mark.parametrize("variant, ext, truth, lie", [
    ("high-002", "npy", b"(32, 32, 3)", b"(32, 22, 3)"),   # fewer pixels: the bytes suffice, the batch would not stack
    ("high-002", "npy", b"(32, 32, 3)", b"(32, 32, 1)"),
    ("factors-006", "u.npy", b"(3, 32, 6)", b"(3, 22, 6)"),
    ("factors-006", "u.npy", b"'<f2'", b"'|V2'"),          # raw bytes: numpy's DTypePromotionError when stacked
])
def test_an_npy_header_that_lies_about_the_array_is_a_shard_error(tmp_path, variant, ext, truth, lie):
    """A damaged shape or dtype in a sample's .npy header (the tar checksum does not cover member data): the
    sample is named, not a bare numpy error ('all input arrays must have the same shape') from the batch."""
    folder = copy_variant(tmp_path, variant=variant)
    path = folder / "train-000002.tar"
    index = scan_shard(str(path))
    offset, _ = index.members[3][ext]
    _flip(path, offset + path.read_bytes()[offset:offset + 128].index(truth), lie)
    with pytest.raises(ShardReadError, match=f"sample {index.keys[3]}: does not decode .*(manifest|float16)"):
        list(eval_loader(open_variant(folder, verify_shards=False), LoaderConfig(batch_size=32, workers=0)))


@pytest.mark.parametrize("variant, encoding, k", [("rank-005", "png", None), ("high-002", "npy", None),
                                                  ("factors-006", "factors", 6)])
def test_corrupt_members_decode_as_stored_or_are_a_shard_error(variant, encoding, k):
    """Property test: each member of a sample (png, npy, u/s/v.npy, cls, json) cut at 16 lengths and flipped at
    127 bits (every bit of an .npy header), batched with a whole sample: the batch keeps the stored labels, shape and dtype, or raises
    ShardReadError; never another exception or a hang. Pixel values may differ (a flip inside PNG's deflate data
    that PIL does not checksum, '<f2' read as '>f2' in an .npy header, whose payload is not flipped here): the
    shard's sha256, checked when a variant opens, is what sees those. A damaged .cls or .json changes nothing."""
    from fuzzing import corruptions, deadline
    from rankshard.loaders.pipeline import collate
    from rankshard.preprocess.format.tarindex import read_shard

    folder = built_root() / "cifar10" / "train" / variant
    (key, members), other = read_shard(folder / "train-000000.tar")[:2]

    def batch(sample):
        return collate([("s.tar", key, sample, None), ("s.tar", other[0], other[1], None)], encoding, k, "raise",
                       (32, 32))[:2]

    x, y = batch(members)
    for ext, data in members.items():
        header = data.index(b"\n") + 1 if ext.endswith("npy") else None  # every bit of an .npy header is flipped
        for damaged in corruptions(data, cuts=16, flips=header * 8 if header else 127, span=header and (0, header)):
            with deadline(2):
                try:
                    got_x, got_y = batch({**members, ext: damaged})
                except ShardReadError:
                    continue
            assert got_y.tolist() == y.tolist() and got_x.shape == x.shape and got_x.dtype == x.dtype, (ext, damaged)
            assert ext not in ("cls", "json") or bool((got_x == x).all()), (ext, damaged)

def _relabel(folder, shard_index=1, sample=2):
    """Change one sample's .cls digit (same length), as a flipped byte would: returns (path, key, old label)."""
    path = folder / f"train-{shard_index:06d}.tar"
    index = scan_shard(str(path))
    offset, size = index.members[sample]["cls"]
    old = int(path.read_bytes()[offset:offset + size])
    _flip(path, offset, str((old + 1) % 10).encode())
    return path, index.keys[sample], old


@pytest.mark.parametrize("workers", [0, 2])
def test_cls_is_cross_checked_against_the_json_label(tmp_path, workers):
    folder = copy_variant(tmp_path)
    path, key, old = _relabel(folder)
    # the tar header checksum does not cover member data, so only the sha256 or the cross-check can see it
    with pytest.raises(ShardReadError) as err:
        list(eval_loader(open_variant(folder, verify_shards=False), LoaderConfig(batch_size=32, workers=workers)))
    message = str(err.value)
    assert str(path) in message and f"sample {key}" in message
    assert f".cls says {(old + 1) % 10}, .json says {old}" in message


def test_skip_policy_skips_and_counts_a_rejected_shard(tmp_path):
    folder = copy_variant(tmp_path)
    path, _ = _corrupt_png(folder, shard_index=2)
    info = open_variant(folder, on_error="skip")
    assert list(info.bad_shards) == [str(path)]
    loader = eval_loader(info, LoaderConfig(batch_size=32, workers=2, on_error="skip"))
    with pytest.warns(LoaderWarning, match="skipped 37 unreadable sample"):
        keys = [k for b in loader for k in b.keys]
    assert loader.skipped == 37 and len(keys) == PNG_SAMPLES - 37
    assert all("shard rejected: sha256" in r and str(path) in r for r in loader.skip_reasons)


def test_skip_policy_counts_and_reports_at_epoch_end(tmp_path):
    folder = copy_variant(tmp_path)
    _, key = _corrupt_png(folder)
    loader = eval_loader(open_variant(folder, verify_shards=False),
                         LoaderConfig(batch_size=32, workers=2, on_error="skip"))
    with pytest.warns(LoaderWarning, match="skipped 1 unreadable sample"):
        keys = [k for b in loader for k in b.keys]
    assert loader.skipped == 1 and key in loader.skip_reasons[0] and len(keys) == PNG_SAMPLES - 1
    assert key not in keys


def test_truncated_shard_raises_or_skips_the_lost_samples(tmp_path):
    folder = copy_variant(tmp_path)
    info = open_variant(folder)  # opened while whole; the file is cut afterwards (e.g. a failing disk)
    path = folder / "train-000001.tar"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ShardReadError, match="train-000001.tar.*truncated"):
        list(eval_loader(info, LoaderConfig(batch_size=16, workers=0)))
    loader = train_loader(info, LoaderConfig(batch_size=10, workers=0, on_error="skip", drop_last=False))
    with pytest.warns(LoaderWarning):
        n = sum(len(b) for b in loader)
    assert loader.skipped > 0 and n + loader.skipped == len(loader) * 10


def test_truncated_shard_is_refused_at_open(tmp_path):
    folder = copy_variant(tmp_path)
    path = folder / "train-000004.tar"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(LoaderError, match="train-000004.tar: 5000 bytes, manifest.json says"):
        open_variant(folder)


def test_missing_manifest_is_refused_with_the_fix(tmp_path):
    folder = copy_variant(tmp_path)
    (folder / "manifest.json").unlink()
    with pytest.raises(LoaderError, match="no manifest.json.*rerun the same `rankshard-preprocess` command"):
        open_variant(folder)



@pytest.mark.parametrize("old, new", [
    ('"sha256"', '"sha25v"'),                  # one flipped bit in a key: was a KeyError
    ('"classes"', '"classEs"'),
    ('"bytes"', '"byter"'),
])
def test_a_manifest_with_a_damaged_field_is_refused_naming_it(tmp_path, old, new):
    folder = copy_variant(tmp_path)
    text = (folder / "manifest.json").read_text()
    assert old in text
    (folder / "manifest.json").write_text(text.replace(old, new, 1))
    with pytest.raises(LoaderError, match="manifest.json: incomplete manifest .*delete it and rerun"):
        open_variant(folder)

def test_a_damaged_manifest_opens_as_written_or_is_a_loader_error(tmp_path):
    """Property test: every field of manifest.json (two levels deep) deleted, or given a value of another JSON
    type: open_variant raises LoaderError, or the field is one the loaders do not read and the first batch is
    the original's; never a KeyError or TypeError."""
    import functools

    from fuzzing import field_paths, with_field

    folder = copy_variant(tmp_path)
    original = json.loads((folder / "manifest.json").read_text())

    def first_batch():
        batch = next(iter(eval_loader(open_variant(folder), LoaderConfig(batch_size=8, workers=0))))
        return batch.x, batch.y.tolist(), batch.keys

    x, y, keys = first_batch()
    others = {str: [0, None, [], {}], int: ["7", None, [], {}], float: ["0.5", None, []], list: ["x", 0, {}, None],
              dict: ["x", 0, [], None], type(None): ["x", []], bool: ["x", None]}
    for path in field_paths(original, depth=2):
        value = functools.reduce(lambda d, k: d[k], path, original)
        for damaged in [...] + others[type(value)]:  # ...: the field deleted
            (folder / "manifest.json").write_text(json.dumps(with_field(original, path, damaged)))
            try:
                got_x, got_y, got_keys = first_batch()
            except LoaderError:
                continue
            assert got_keys == keys and got_y == y and bool((got_x == x).all()), (path, damaged)


def test_a_misspelt_variant_lists_the_variants_there(tmp_path):
    """`--train-variant rank-007` where only rank-005 exists said 'no manifest.json ... rerun the same
    rankshard-preprocess command', as if a run had been interrupted; it names what the split holds."""
    folder = copy_variant(tmp_path)
    with pytest.raises(LoaderError, match=r"rank-007: no such folder; .* holds \['" + folder.name + r"'\]"):
        open_variant(folder.parent / "rank-007")


def test_a_misspelt_split_names_the_split_level_not_the_variant(tmp_path):
    """`--train-split val` on CIFAR-10: the first folder that is not there is the split, so that is what is named."""
    split = tmp_path / "cifar10" / "train"
    copy_variant(split)
    with pytest.raises(LoaderError, match=r"cifar10/val: no such folder; .*cifar10 holds \['train'\]"):
        open_variant(tmp_path / "cifar10" / "val" / "rank-005")


def test_missing_and_unlisted_shards_are_refused(tmp_path):
    folder = copy_variant(tmp_path)
    shutil.copy(folder / "train-000000.tar", folder / "train-000099.tar")
    with pytest.raises(LoaderError, match="train-000099.tar: a shard not listed"):
        open_variant(folder)
    (folder / "train-000099.tar").unlink()
    (folder / "train-000003.tar").unlink()
    with pytest.raises(LoaderError, match="train-000003.tar: listed in manifest.json but missing"):
        open_variant(folder)


def test_mismatched_manifest_is_refused(tmp_path):
    folder = copy_variant(tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["num_samples"] += 1
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LoaderError, match="sum to 230, not num_samples 231"):
        open_variant(folder)
    manifest["format"] = "other/9"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LoaderError, match="format 'other/9'"):
        open_variant(folder)


def test_spectra_and_unknown_urls_are_refused():
    root = built_root()
    with pytest.raises(LoaderError, match="holds no images"):
        open_variant(root, "cifar10", "train", "spectra")
    with pytest.raises(LoaderError, match="not a shard of this variant"):
        open_variant(str(root / "cifar10/train/full/train-{000005..000009}.tar"))
    with pytest.raises(LoaderError, match="unknown scheme nosuch://"):
        open_variant("nosuch://host/train-{000000..000001}.tar")


def test_configuration_errors_name_the_fix():
    info = open_variant(built_root(), "cifar10", "train", "factors-006")
    with pytest.raises(LoaderError, match="augment="):
        LoaderConfig(augment="autoaugment")
    with pytest.raises(LoaderError, match="on_error="):
        LoaderConfig(on_error="ignore")
    with pytest.raises(LoaderError, match="rank="):
        LoaderConfig(rank=("middle", 3))
    assert LoaderConfig(rank="high:2").rank == ("high", 2) and LoaderConfig(rank=5).rank == ("low", 5)
    with pytest.raises(LoaderError, match="exceeds the K=6 factors"):
        eval_loader(info, LoaderConfig(factors_k=7))
    with pytest.raises(LoaderError, match="rank 2 of world size 2"):
        eval_loader(info, LoaderConfig(), rank=2, world_size=2)
    with pytest.raises(LoaderError, match="start_step 99"):
        train_loader(info, LoaderConfig(batch_size=16), start_step=99)


def test_join_variants_refuses_a_shard_open_variant_rejected(tmp_path):
    """A variant opened with on_error='skip' keeps its sha256-rejected shards in ``bad_shards``; the join
    (which reads with on_error='raise') must not read their samples as if they were whole."""
    from rankshard.loaders import join_variants
    folder = copy_variant(tmp_path)
    full = open_variant(copy_variant(tmp_path, variant="full"))
    path, _ = _corrupt_png(folder, shard_index=0, sample=3)
    low = open_variant(folder, on_error="skip")
    assert list(low.bad_shards) == [str(path)]
    with pytest.raises(ShardReadError, match=f"{path}: sample 00000000: shard rejected: sha256"):
        list(join_variants(low, full, batch_size=16, rank=0, world_size=1))


def test_a_killed_loader_worker_is_a_loader_error_naming_the_fix():
    """A DataLoader worker killed mid-epoch (the OOM killer) stops the epoch with a RankshardError the CLIs
    report without a traceback, not torch's bare RuntimeError."""
    import multiprocessing
    import os
    import signal
    info = open_variant(built_root(), "cifar10", "train", "rank-005")
    loader = train_loader(info, LoaderConfig(batch_size=4, workers=2, shuffle_buffer=8, prefetch_factor=1))
    others = {p.pid for p in multiprocessing.active_children()}
    with pytest.raises(LoaderError, match=r"a loader worker process died \(DataLoader worker .*lower workers"):
        for step, _ in enumerate(loader):
            if step == 1:  # the killed worker owns every other one of the ~50 steps left: one must be missing
                workers = [p.pid for p in multiprocessing.active_children() if p.pid not in others]
                os.kill(workers[0], signal.SIGKILL)


def _raise_in_worker(*args, **kwargs):
    raise RuntimeError("a bug in decoding")


def test_an_error_raised_inside_a_worker_is_not_called_a_death(monkeypatch):
    """torch re-raises a worker's own exception as "Caught RuntimeError in DataLoader worker process 0": that
    is the error itself, not a dead process, and must not be dressed up as "lower workers"."""
    import multiprocessing

    from rankshard.loaders import pipeline

    if multiprocessing.get_start_method() != "fork":
        pytest.skip("the patched collate reaches the workers only when they are forked")
    monkeypatch.setattr(pipeline, "collate", _raise_in_worker)
    info = open_variant(built_root(), "cifar10", "train", "rank-005")
    loader = train_loader(info, LoaderConfig(batch_size=4, workers=1, shuffle_buffer=8, prefetch_factor=1))
    with pytest.raises(RuntimeError, match="a bug in decoding") as caught:
        next(iter(loader))
    assert not isinstance(caught.value, LoaderError)


_STOP_SIGNALS = """
import multiprocessing, signal, sys, time
from rankshard.loaders import pipeline


def worker(released, ready):
    pipeline._serve_through_stop_signals((signal.SIGTERM,), released, 0)
    ready.set()
    time.sleep(120)


if __name__ == "__main__":
    ctx = multiprocessing.get_context("spawn")
    released, ready = ctx.Event(), ctx.Event()
    child = ctx.Process(target=worker, args=(released, ready), daemon=True)
    child.start()
    assert ready.wait(120)
    child.terminate()             # the group's SIGTERM while the main process still iterates
    time.sleep(1.0)
    print(child.is_alive(), flush=True)
    released.set()                # the epoch loop is over
    child.terminate()             # torch's shutdown of a stuck worker
    child.join(60)
    print(child.exitcode, flush=True)
"""


def test_a_loader_worker_serves_through_a_stop_signal_until_its_main_process_lets_it_go(tmp_path):
    """The group-wide SIGTERM of a preemption must not kill the workers before the trainer saves; once the
    epoch loop is over, the SIGTERM torch's shutdown sends a stuck worker must end it."""
    import subprocess
    import sys

    script = tmp_path / "main.py"
    script.write_text(_STOP_SIGNALS)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["True", "0"], out.stderr[-2000:]
