import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from procs import alive, worker_pids

from rankshard.preprocess.format import tar as shards_module
from rankshard.preprocess.format.tarindex import read_shard
from rankshard.preprocess.cli import main
from rankshard.preprocess.errors import LockedError, RankshardError, SourceError
from rankshard.preprocess.imagejob import imagenet_source
from rankshard.preprocess.sources.images import Geometry
from rankshard.preprocess.sources.listing import read_bytes
from rankshard.preprocess.locking import RunLock
from rankshard.preprocess.pipeline import materialize_split
from rankshard.preprocess.spec import ShardSpec
from rankshard.preprocess.sources.synthtree import WNIDS, hostile_files, tar_bytes, write_flat_val, write_train_tar, write_train_tree
from rankshard.preprocess.verify import verify_tree

REPO = Path(__file__).resolve().parents[1]
GEOMETRY = Geometry(24, 24)
BAD = {"odd_truncated.JPEG", "odd_empty.JPEG", "odd_bomb.JPEG", "odd_text.JPEG"}


def _tars(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.tar"))}


def _manifest(out: Path, dataset="imagenet", split="train", variant="rank-005") -> dict:
    return json.loads((out / dataset / split / variant / "manifest.json").read_text())


def _meta_mat(wnids, names) -> bytes:
    scipy_io = pytest.importorskip("scipy.io")
    recs = np.zeros((len(wnids), 1), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"),
                                             ("num_children", "O")])
    # ILSVRC2012_IDs deliberately NOT in sorted-wnid order: the class index must come from the sorted wnids
    for i, (wnid, name) in enumerate(zip(wnids, names)):
        recs[len(wnids) - 1 - i, 0] = (np.array([[len(wnids) - i]], float), wnid, name, np.array([[0.0]]))
    buf = io.BytesIO()
    scipy_io.savemat(buf, {"synsets": recs}, do_compression=True)
    return buf.getvalue()


NAMES = ("tench, Tinca tinca", "goldfish", "great white shark")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """An ILSVRC-like root: train/<wnid>/ (with the odd files), flat val/, devkit, Kaggle files, both tars."""
    root = tmp_path_factory.mktemp("ilsvrc")
    odd = write_train_tree(root / "train", classes=3, per_class=6)
    labels = write_flat_val(root / "val", classes=3, count=9)
    wnids = WNIDS[:3]
    data = root / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    (data / "meta.mat").write_bytes(_meta_mat(wnids, NAMES))
    # the ground truth holds ILSVRC2012_IDs: wnid i has ID 3 - i in _meta_mat
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{3 - y}\n" for y in labels))
    kaggle = root / "kaggle"
    kaggle.mkdir()
    (kaggle / "LOC_synset_mapping.txt").write_text("".join(f"{w} {n}\n" for w, n in zip(wnids, NAMES)))
    (kaggle / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "".join(
        f"ILSVRC2012_val_{i + 1:08d},{wnids[y]} 1 2 3 4 {wnids[y]} 5 6 7 8\n" for i, y in enumerate(labels)))
    archives = root / "archives"
    archives.mkdir()
    write_train_tar(archives / "ILSVRC2012_img_train.tar", root / "train")
    (archives / "ILSVRC2012_img_val.tar").write_bytes(
        tar_bytes({p.name: p.read_bytes() for p in sorted((root / "val").iterdir())}))
    return {"root": root, "odd": odd, "val_labels": labels}


def _spec(split="train", **kw):
    base = dict(dataset="imagenet", split=split, ranks=(1, 5), high=(2,), shard_size=8, batch_size=3, workers=0,
                backend="gram64", shuffle=split == "train")
    return ShardSpec(**{**base, **kw})


# -- layouts ------------------------------------------------------------------------------------------------


def test_train_folder_and_nested_tar_list_the_same_images(tree, tmp_path):
    folder = imagenet_source(tree["root"], "train", GEOMETRY, tmp_path / "c1")
    tar = imagenet_source(tree["root"] / "archives", "train", GEOMETRY, tmp_path / "c2")
    assert folder.listing.ids == tar.listing.ids and len(folder) == 3 * 6 + 9
    assert list(folder.listing.label) == list(tar.listing.label)
    assert folder.classes == WNIDS[:3] and folder.class_names == NAMES  # names found in the devkit nearby
    for i in range(len(folder)):  # the nested tar's offsets point at exactly the file's bytes
        assert read_bytes(*tar.listing.entry(i)) == read_bytes(*folder.listing.entry(i))


def test_hidden_members_of_a_train_tar_packed_on_a_mac_are_skipped_like_hidden_files(tmp_path):
    """``._NAME`` resource forks and ``.DS_Store`` inside the class tars and the outer tar: the folder layout
    skips such hidden files, so the tar lists the same images (and no ``._n01440764`` class)."""
    tree = tmp_path / "tree"
    write_train_tree(tree, classes=2, per_class=3, odd=False)
    inner = {}
    for d in sorted(tree.iterdir()):
        files = {f.name: f.read_bytes() for f in sorted(d.iterdir())}
        inner[f"{d.name}.tar"] = tar_bytes({**files, **{f"._{n}": b"\0\5\26\7" for n in files}, ".DS_Store": b"x"})
    inner.update({f"._{n}": b"\0\5\26\7" for n in list(inner)} | {".DS_Store": b"x"})
    (tmp_path / "archive").mkdir()
    (tmp_path / "archive" / "ILSVRC2012_img_train.tar").write_bytes(tar_bytes(inner))
    folder = imagenet_source(tree, "train", GEOMETRY, tmp_path / "c1")
    tar = imagenet_source(tmp_path / "archive", "train", GEOMETRY, tmp_path / "c2")
    assert tar.classes == folder.classes == WNIDS[:2]
    assert tar.listing.ids == folder.listing.ids and len(tar) == 6


@pytest.mark.parametrize("layout", ["devkit", "kaggle", "val_tar", "val_folders"])
def test_val_layouts_agree_on_labels(tree, tmp_path, layout):
    root = tree["root"]
    if layout == "val_folders":  # val/<wnid>/ as made by the usual valprep script
        for name, y in zip(sorted(p.name for p in (root / "val").iterdir()), tree["val_labels"]):
            (tmp_path / "v" / "val" / WNIDS[y]).mkdir(parents=True, exist_ok=True)
            (tmp_path / "v" / "val" / WNIDS[y] / name).write_bytes((root / "val" / name).read_bytes())
    source, devkit = {"devkit": (root, None), "kaggle": (root, root / "kaggle"),
                      "val_tar": (root / "archives", None), "val_folders": (tmp_path / "v", None)}[layout]
    src = imagenet_source(source, "val", GEOMETRY, tmp_path / "cache", devkit)
    by_name = dict(zip((Path(i).name for i in src.listing.ids), src.listing.label.tolist()))
    assert by_name == {f"ILSVRC2012_val_{i + 1:08d}.JPEG": y for i, y in enumerate(tree["val_labels"])}
    assert src.classes == WNIDS[:3]


def test_flat_val_without_labels_says_what_to_add(tmp_path):
    write_flat_val(tmp_path / "val", count=2)
    with pytest.raises(SourceError, match="LOC_val_solution.csv"):
        imagenet_source(tmp_path, "val", GEOMETRY, None)


def test_listing_is_cached_and_rebuilt_when_the_tree_changes(tree, tmp_path):
    import shutil

    shutil.copytree(tree["root"] / "train", tmp_path / "train")
    first = imagenet_source(tmp_path, "train", GEOMETRY, tmp_path / "cache")
    again = imagenet_source(tmp_path, "train", GEOMETRY, tmp_path / "cache")
    assert not first.info["listing_cached"] and again.info["listing_cached"]
    assert again.listing.ids == first.listing.ids and again.info["fingerprint"] == first.info["fingerprint"]
    extra = tmp_path / "train" / WNIDS[1] / "added.JPEG"
    extra.write_bytes((tmp_path / "train" / WNIDS[1] / f"{WNIDS[1]}_0.JPEG").read_bytes())
    changed = imagenet_source(tmp_path, "train", GEOMETRY, tmp_path / "cache")
    assert not changed.info["listing_cached"] and len(changed) == len(first) + 1


def test_verify_md5_checks_the_published_sums(tree, tmp_path, monkeypatch):
    from rankshard.preprocess.sources import imagenet

    archives = tree["root"] / "archives"
    with pytest.raises(SourceError, match="md5 .* published ILSVRC2012_img_train.tar"):
        imagenet_source(archives, "train", GEOMETRY, tmp_path / "c", verify_md5=True)
    from rankshard.preprocess.sources.folders import file_md5

    monkeypatch.setitem(imagenet.ARCHIVE_MD5, "ILSVRC2012_img_train.tar", file_md5(archives / "ILSVRC2012_img_train.tar"))
    src = imagenet_source(archives, "train", GEOMETRY, tmp_path / "c", verify_md5=True)
    assert src.info["checksum_verified"] is True
    with pytest.raises(SourceError, match="extracted folders"):
        imagenet_source(tree["root"], "train", GEOMETRY, tmp_path / "c", verify_md5=True)


# -- the job ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    src = imagenet_source(tree["root"], "train", GEOMETRY, out / "imagenet/train/.listing")
    result = materialize_split(src, _spec(), out, show_progress=False)
    return out, result, src


def test_bad_files_are_skipped_recorded_and_keys_keep_their_positions(built, tree):
    out, result, src = built
    m = _manifest(out)
    reasons = {Path(e["source"]).name: e["reason"] for e in m["errors"]}
    assert set(reasons) == BAD
    for name, outcome in tree["odd"].items():
        if outcome != "ok":
            assert outcome in reasons[Path(name).name]
    assert m["num_samples"] == len(src) - len(BAD) and sum(m["class_counts"]) == m["num_samples"]
    samples = [s for p in sorted((out / "imagenet/train/rank-005").glob("*.tar"))
               for s in read_shard(p)]
    keys = [int(k) for k, _ in samples]
    assert keys == sorted(keys) and len(keys) == m["num_samples"]
    gaps = sorted(set(range(len(src))) - set(keys))
    assert gaps == sorted(e["index"] for e in m["errors"])       # each skipped file leaves its own key out
    assert m["image_size"] == [24, 24] and m["png_compress_level"] == 1
    assert json.loads(samples[0][1]["json"])["class_name"] in NAMES
    assert verify_tree(out).ok


def test_decoding_in_this_process_is_counted_as_decode_time(built):
    """--workers 0: the summary's read/decode stage showed 0 s, the decoding counted only as waiting."""
    _, result, _ = built
    stats = result["stats"]
    assert stats["decode"] <= stats["read"] + 0.001  # timed inside the job, so within the time around it
    assert stats["decode"] > 0 or stats["read"] <= 0.002  # (stats are rounded to the millisecond)


def test_rerun_with_decode_workers_is_byte_identical(built, tree, tmp_path):
    out, _, _ = built
    src = imagenet_source(tree["root"], "train", GEOMETRY, tmp_path / "cache")
    materialize_split(src, _spec(workers=1), tmp_path, show_progress=False)
    assert _tars(tmp_path) == _tars(out)


def test_the_gpu_paths_split_gives_the_same_bytes_on_cpu(built, tree, tmp_path, monkeypatch):
    """With CUDA, this process runs the numeric chain while workers decode ahead and encode + write (CPU:
    workers make whole shards). CI has no GPU, so that split runs here on the CPU engine: same shards."""
    from rankshard.preprocess.pipeline import Materializer

    out, _, _ = built
    routed = []

    def split_path(self, pool, engine, todo, digest, bar):
        routed.append(pool is not None)
        self._shards_here(pool, engine, todo, self._context(digest), bar)

    monkeypatch.setattr(Materializer, "_write_all", split_path)
    src = imagenet_source(tree["root"], "train", GEOMETRY, tmp_path / "cache")
    result = materialize_split(src, _spec(workers=2), tmp_path, show_progress=False)
    assert routed == [True] and result["stats"]["decode"] > 0  # decoded in the workers, not here
    assert _tars(tmp_path) == _tars(out)


def test_nested_tar_source_gives_the_same_shards(built, tree, tmp_path):
    out, _, _ = built
    src = imagenet_source(tree["root"] / "archives", "train", GEOMETRY, tmp_path / "cache")
    materialize_split(src, _spec(), tmp_path, show_progress=False)
    assert _tars(tmp_path) == _tars(out)


def test_strict_stops_at_the_first_bad_file(tree, tmp_path):
    src = imagenet_source(tree["root"], "train", GEOMETRY, None)
    with pytest.raises(SourceError, match=r"odd_(truncated|empty|bomb|text)\.JPEG.*--strict"):
        materialize_split(src, _spec(), tmp_path, show_progress=False, on_error="raise")


def test_full_disk_leaves_nothing_that_verifies_and_rerun_completes(built, tree, tmp_path, monkeypatch):
    out, _, _ = built
    src = imagenet_source(tree["root"], "train", GEOMETRY, None)
    real_write, calls = shards_module._HashingWriter.write, {"n": 0}

    def failing_write(self, data):
        calls["n"] += 1
        if calls["n"] > 40:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(shards_module._HashingWriter, "write", failing_write)
    with pytest.raises(RankshardError, match="disk is full"):
        materialize_split(src, _spec(), tmp_path, show_progress=False)
    assert not list(tmp_path.rglob("manifest.json")) and not list(tmp_path.rglob(".*.partial"))
    monkeypatch.setattr(shards_module._HashingWriter, "write", real_write)
    materialize_split(src, _spec(), tmp_path, show_progress=False)
    assert _tars(tmp_path) == _tars(out)


def test_unwritable_output_is_a_clear_error(tree, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = CliRunner().invoke(main, ["imagenet", "--source", str(tree["root"]), "--split", "train", "--out",
                                       str(blocker / "out"), "--workers", "0", "--quiet"])
    assert result.exit_code == 2 and "cannot create the output folder" in result.output


def test_backend_none_runs_the_pipeline_without_svd(tree, tmp_path):
    src = imagenet_source(tree["root"], "train", GEOMETRY, None)
    result = materialize_split(src, _spec(backend="none", high=()), tmp_path, show_progress=False)
    m = result["manifests"]["rank-005"]
    assert m["svd"]["backend"] == "none" and m["num_samples"] == len(src) - len(BAD)
    full = _tars(tmp_path / "imagenet/train/full")
    low = _tars(tmp_path / "imagenet/train/rank-005")
    assert len(full) == len(low)


# -- torchrun-style ranks, locking, kill -9 -----------------------------------------------------------------


def _cli(root, out, *extra):
    return [sys.executable, "-m", "rankshard.preprocess", "imagenet", "--source", str(root), "--split", "train", "--out",
            str(out), "--ranks", "1,5", "--high", "2", "--shard-size", "8", "--batch-size", "3", "--workers", "0",
            "--backend", "gram64", "--resize", "24", "--crop", "24", "--quiet", *extra]


def _env(**kw):
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **kw}


def test_two_ranks_write_the_same_shards_as_one_process(built, tree, tmp_path):
    out, _, _ = built
    procs = [subprocess.Popen(_cli(tree["root"], tmp_path), env=_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                                                      RANKSHARD_RUN_ID="t2"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert _tars(tmp_path) == _tars(out)
    assert _manifest(tmp_path)["num_samples"] == _manifest(out)["num_samples"]
    assert verify_tree(tmp_path).ok


def test_lock_admits_ranks_of_one_run_and_refuses_another_run(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKSHARD_RUN_ID", "a")
    with RunLock(tmp_path, 0, 2), RunLock(tmp_path, 1, 2):
        with pytest.raises(LockedError, match="already runs as rank 1"):
            RunLock(tmp_path, 1, 2).__enter__()
        with pytest.raises(LockedError, match="another run"):
            RunLock(tmp_path, 0, 1).__enter__()
        monkeypatch.setenv("RANKSHARD_RUN_ID", "b")
        with pytest.raises(LockedError, match="another run"):
            RunLock(tmp_path, 0, 2).__enter__()
    with RunLock(tmp_path, 0, 1):
        with pytest.raises(LockedError):
            RunLock(tmp_path, 0, 1).__enter__()


def test_resume_after_kill_9_is_byte_identical(built, tree, tmp_path):
    out, _, _ = built
    proc = subprocess.Popen(_cli(tree["root"], tmp_path), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    shards = tmp_path / "imagenet/train/rank-005"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(shards.glob("*.tar"))) < 2 and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (shards / "manifest.json").exists(), "the run finished before it could be killed"
    result = subprocess.run(_cli(tree["root"], tmp_path), env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _tars(tmp_path) == _tars(out) and verify_tree(tmp_path).ok


def _wait_for_workers(proc, count: int) -> list[int]:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        pids = worker_pids(proc.pid)
        if len(pids) >= count:
            return pids
        time.sleep(0.01)
    raise AssertionError(f"no {count} workers appeared (exit status {proc.poll()})")


def test_a_killed_worker_stops_the_job_with_a_message_and_the_rerun_is_byte_identical(built, tree, tmp_path):
    out, _, _ = built
    cli = _cli(tree["root"], tmp_path, "--workers", "2")  # the later --workers wins
    proc = subprocess.Popen(cli, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim, other = _wait_for_workers(proc, 2)
    os.kill(victim, signal.SIGKILL)  # what the OOM killer does
    killed_at = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - killed_at < 10, "a dead worker must stop the job within seconds, not hang it"
    assert proc.returncode != 0, "the run finished before it could be killed"
    assert f"worker process {victim} was killed by SIGKILL" in stderr and "rerun the same command" in stderr
    assert "Traceback" not in stderr and not alive(other)
    assert not (tmp_path / "imagenet/train/rank-005/manifest.json").exists()
    assert not [p for p in tmp_path.rglob("*.tar") if p.read_bytes() != (out / p.relative_to(tmp_path)).read_bytes()]
    result = subprocess.run(cli, env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _tars(tmp_path) == _tars(out) and verify_tree(tmp_path).ok


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_stopping_the_main_process_leaves_no_workers_behind(tree, tmp_path, sig):
    proc = subprocess.Popen(_cli(tree["root"], tmp_path, "--workers", "2"), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    workers = _wait_for_workers(proc, 2)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while any(alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in workers), "orphaned workers"
    if sig == signal.SIGTERM:
        assert proc.returncode != 0 and "stopped by SIGTERM" in stderr and "Traceback" not in stderr


# -- folder and wds -----------------------------------------------------------------------------------------


def test_folder_and_wds_commands(tree, tmp_path):
    runner = CliRunner()
    common = ["--out", str(tmp_path / "o"), "--ranks", "3", "--workers", "0", "--shard-size", "10", "--quiet",
              "--crop", "16", "--backend", "gram64"]
    r = runner.invoke(main, ["folder", "--source", str(tree["root"] / "train"), "--name", "mine", *common])
    assert r.exit_code == 0, r.output
    m = _manifest(tmp_path / "o", "mine", "train", "rank-003")
    assert m["classes"] == list(WNIDS[:3]) and len(m["errors"]) == len(BAD) and m["image_size"] == [16, 16]
    # existing WebDataset shards: jpg + cls members
    shard_dir = tmp_path / "wds"
    shard_dir.mkdir()
    files = sorted((tree["root"] / "train" / WNIDS[1]).iterdir())
    for s in range(2):
        members = {}
        for i, f in enumerate(files[s * 3:(s + 1) * 3]):
            members[f"s{s}_{i}.jpg"], members[f"s{s}_{i}.cls"] = f.read_bytes(), str(s).encode()
        (shard_dir / f"in-{s:06d}.tar").write_bytes(tar_bytes(members))
    r = runner.invoke(main, ["wds", "--source", str(shard_dir / "in-{000000..000001}.tar"), *common])
    assert r.exit_code == 0, r.output
    m = _manifest(tmp_path / "o", "wds", "train", "rank-003")
    assert m["num_samples"] == 6 and m["class_counts"] == [3, 3] and verify_tree(tmp_path / "o").ok


def test_hostile_sizes_are_skipped_with_reasons_or_stop_a_strict_run(tmp_path):
    root = tmp_path / "src"
    write_train_tree(root, classes=2, per_class=3, odd=False)
    for name, (data, _) in hostile_files().items():
        (root / WNIDS[0] / name).write_bytes(data)
    common = ["folder", "--source", str(root), "--ranks", "3", "--workers", "0", "--quiet", "--crop", "16",
              "--backend", "gram64"]
    r = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    errors = {e["source"].rsplit("/", 1)[-1]: e["reason"] for e in _manifest(tmp_path / "o", "src", "train", "rank-003")["errors"]}
    assert {name: reason in errors.get(name, "") for name, (_, reason) in hostile_files().items()} == \
        {name: True for name in hostile_files()}
    r = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "s"), "--strict"])
    assert r.exit_code == 2 and "--strict, stops at the first bad" in r.output and "hostile_" in r.output


def test_estimate_decodes_a_spread_sample_and_writes_only_the_listing_cache(built, tree, tmp_path):
    _, _, src = built
    result = CliRunner().invoke(main, ["imagenet", "--source", str(tree["root"]), "--split", "train", "--out",
                                       str(tmp_path), "--ranks", "1,5", "--high", "2", "--batch-size", str(len(src)),
                                       "--workers", "0", "--backend", "gram64", "--resize", "24", "--crop", "24",
                                       "--estimate"])
    assert result.exit_code == 0, result.output
    # every image measured: the bad files are found as in the real run
    assert f"imagenet/train: {len(src)} images; measured on all of them, made in one process ({len(BAD)} " \
           "unreadable, skipped)" in result.output
    assert not list(tmp_path.rglob("*.tar")) and list(tmp_path.rglob(".listing/*"))
