"""Loaders on real shards: exactly-once evaluation, equal steps, resume, decode round trips, rank, joins."""
import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from rankshard.loaders import LoaderConfig, eval_loader, join_variants, open_variant, train_loader
from loaders_shards import NPY_SAMPLES, PNG_SAMPLES, built_root
from rankshard.preprocess.rank.engine import reference_low_rank

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


@pytest.fixture(scope="module")
def root():
    return built_root()


def _info(root, variant="rank-005", split="train"):
    return open_variant(root, "cifar10", split, variant)


def _tar_samples(info):
    """Independent read: tarfile -> {key: {ext: bytes}} in file order."""
    out = {}
    for url in info.urls:
        with tarfile.open(url) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def test_open_variant_reports_the_manifest(root):
    info = _info(root)
    assert info.num_samples == PNG_SAMPLES and info.shard_sizes == [37] * 6 + [8]
    assert info.num_classes == 10 and info.image_size == (32, 32) and info.encoding == "png"
    assert info.mode == "low" and info.rank == 5 and info.mean[0] == pytest.approx(0.4914)
    same = open_variant(info.folder)
    assert same.urls == info.urls
    subset = open_variant(str(info.folder / "train-{000001..000002}.tar"))
    assert subset.num_samples == 74 and len(subset.urls) == 2


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 2, 3])
def test_eval_exactly_once_across_ranks_and_workers(root, world, workers):
    info = _info(root)
    cfg = LoaderConfig(batch_size=16, workers=workers)
    loaders = [eval_loader(info, cfg, rank=r, world_size=world) for r in range(world)]
    assert len({len(loader) for loader in loaders}) == 1
    keys = []
    for loader in loaders:
        batches = list(loader)
        assert len(batches) == len(loader) and [b.step for b in batches] == list(range(len(loader)))
        keys += [k for b in batches for k in b.keys]
    assert keys == sorted(_tar_samples(info))  # each once, manifest (= key) order


def test_train_steps_equal_across_ranks_and_epoch_partition(root):
    info = _info(root)
    cfg = LoaderConfig(batch_size=16, workers=0, shuffle_buffer=40)
    loaders = [train_loader(info, cfg, epoch=2, rank=r, world_size=3) for r in range(3)]
    assert [len(loader) for loader in loaders] == [PNG_SAMPLES // 48] * 3
    keys = [k for loader in loaders for b in loader for k in b.keys]
    assert len(keys) == len(set(keys)) == 3 * 4 * 16


def test_train_batches_depend_on_seed_and_epoch_not_on_workers(root):
    info = _info(root)
    base = dict(batch_size=16, augment="cifar", shuffle_buffer=40)
    a = list(train_loader(info, LoaderConfig(workers=0, **base), epoch=1))
    b = list(train_loader(info, LoaderConfig(workers=2, **base), epoch=1))
    assert all(x.keys == y.keys and torch.equal(x.x, y.x) for x, y in zip(a, b)) and len(a) == len(b)
    c = list(train_loader(info, LoaderConfig(workers=0, **base), epoch=2))
    assert a[0].keys != c[0].keys
    labels = torch.cat([x.y for x in a])
    assert len(set(labels[:16].tolist())) >= 5  # shuffled: a batch mixes classes


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_at_start_step_reproduces_the_remaining_batches(root, workers):
    info = _info(root)
    cfg = LoaderConfig(batch_size=16, workers=workers, augment="cifar", shuffle_buffer=40, seed=4)
    full = list(train_loader(info, cfg, epoch=3))
    resumed = train_loader(info, cfg, epoch=3, start_step=5)
    rest = list(resumed)
    assert len(resumed) == len(full) and len(rest) == len(full) - 5
    for x, y in zip(full[5:], rest):
        assert x.step == y.step and x.keys == y.keys and torch.equal(x.x, y.x) and torch.equal(x.y, y.y)


def test_png_decode_round_trip(root):
    info = _info(root)
    raw = _tar_samples(info)
    for b in eval_loader(info, LoaderConfig(batch_size=64, workers=0)):
        for key, x, y in zip(b.keys, b.x, b.y):
            pil = np.asarray(Image.open(io.BytesIO(raw[key]["png"])).convert("RGB")).transpose(2, 0, 1)
            assert np.array_equal(np.round(x.numpy() * 255).astype(np.uint8), pil) and int(raw[key]["cls"]) == y


@pytest.mark.parametrize("variant", ["full", "rank-003"])
def test_npy_decode_round_trip(root, variant):
    info = _info(root, variant, "test")
    raw = _tar_samples(info)
    keys = []
    for b in eval_loader(info, LoaderConfig(batch_size=32, workers=0)):
        for key, x in zip(b.keys, b.x):
            ref = np.load(io.BytesIO(raw[key]["npy"])).astype(np.float32).transpose(2, 0, 1)
            assert np.array_equal(x.numpy(), ref)
        keys += b.keys
    assert len(keys) == NPY_SAMPLES


def test_high_rank_decodes_signed_values(root):
    info = _info(root, "high-002")
    x = next(iter(eval_loader(info, LoaderConfig(batch_size=8, workers=0)))).x
    assert x.min() < 0  # x - x_k is signed; nothing clips it


@pytest.mark.parametrize("k", [1, 4, 6])
def test_factors_reconstruct_at_any_k(root, k):
    info = _info(root, "factors-006")
    full = next(iter(eval_loader(_info(root, "full"), LoaderConfig(batch_size=8, workers=0))))
    b = next(iter(eval_loader(info, LoaderConfig(batch_size=8, workers=0, factors_k=k))))
    raw = _tar_samples(info)
    assert b.keys == full.keys
    for key, x, xf in zip(b.keys, b.x, full.x):
        u, s, v = (np.load(io.BytesIO(raw[key][m])).astype(np.float64) for m in ("u.npy", "s.npy", "v.npy"))
        literal = sum(s[:, j, None, None] * u[:, :, j, None] * v[:, None, :, j] for j in range(k))
        assert np.max(np.abs(x.numpy() - literal)) < 1e-5
        ref = reference_low_rank(xf.double().numpy()[None], k)[0]
        assert np.max(np.abs(x.numpy() - ref)) < 1e-2  # float16 factors (verify's tolerance)


def test_on_the_fly_rank_matches_the_float64_reference(root):
    full = _info(root, "full")
    plain = next(iter(eval_loader(full, LoaderConfig(batch_size=8, workers=0))))
    for mode in ("low", "high"):
        b = next(iter(eval_loader(full, LoaderConfig(batch_size=8, workers=0, rank=(mode, 3), svd_backend="numpy"))))
        ref = reference_low_rank(plain.x.double().numpy(), 3)
        ref = ref if mode == "low" else plain.x.double().numpy() - ref
        assert np.max(np.abs(b.x.numpy() - ref)) < 1e-4


def test_training_augmentation_of_rank_k_batches_keeps_rank_k(root):
    cfg = LoaderConfig(batch_size=8, workers=0, augment="cifar", rank=("low", 5), svd_backend="numpy")
    b = next(iter(train_loader(_info(root, "full"), cfg)))
    s = np.linalg.svd(b.x.double().numpy(), compute_uv=False)  # [B, C, 32]
    assert np.max(s[..., 5] / s[..., 0]) < 1e-5


def test_join_variants_pairs_rank_k_with_its_full_twin(root):
    low, full = _info(root), _info(root, "full")
    joined = list(join_variants(low, full, batch_size=50, rank=1, world_size=2))
    keys = [k for b in joined for k in b.keys]
    assert keys == [k for b in eval_loader(low, LoaderConfig(batch_size=50, workers=0), 1, 2) for k in b.keys]
    b = joined[0]
    ref = reference_low_rank(b.xs[1].double().numpy(), 5)
    assert np.max(np.abs(b.xs[0].numpy() - np.clip(ref, 0, 1))) < 0.5 / 255 + 2e-4  # png rounding


@pytest.mark.gpu
def test_device_path_gives_the_cpu_batches(root):
    """With device='cuda', rank and augmentation run after the transfer, from the same seeds."""
    base = dict(batch_size=16, workers=0, augment="cifar", rank=("low", 5), shuffle_buffer=40)
    cpu = list(train_loader(_info(root, "full"), LoaderConfig(**base)))
    gpu = list(train_loader(_info(root, "full"), LoaderConfig(device="cuda", **base)))
    for a, b in zip(cpu, gpu):
        assert b.x.is_cuda and a.keys == b.keys and torch.allclose(a.x, b.x.cpu(), atol=1e-4)
