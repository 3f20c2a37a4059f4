"""factors-K: one reconstruction (``preprocess.rank.factors.reconstruct``) for every reader, on any device, and
the loader handing factors over to be reconstructed in the workers, after the transfer, or by the caller."""
import io
import tarfile

import numpy as np
import pytest
import torch

from rankshard.loaders import Factors, LoaderConfig, LoaderError, eval_loader, open_variant, reconstruct, train_loader
from rankshard.loaders.decode import decode_sample
from rankshard.preprocess.format.codec import decode_image
from rankshard.preprocess.rank.engine import RankEngine
from rankshard.preprocess.rank.factors import reconstruct_numpy
from rankshard.preprocess.sources.synth import labelled_images
from loaders_shards import built_root

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")

K, SMALL_K = 6, 3  # the shared shards store factors-006


def literal(u, s, v, k) -> np.ndarray:
    """float64 ``sum_{j<k} s_j u_j v_j^T`` per matrix, one rank-1 term at a time (u [..,H,K], s [..,K], v [..,W,K])."""
    u, s, v = (np.asarray(t, dtype=np.float64) for t in (u, s, v))
    out = np.zeros((*s.shape[:-1], u.shape[-2], v.shape[-2]))
    for idx in np.ndindex(*s.shape[:-1]):
        for j in range(k):
            out[idx] += s[idx][j] * np.outer(u[idx][:, j], v[idx][:, j])
    return out


@pytest.fixture(scope="module")
def factors224():
    """Stored-form (float16) top-64 factors of two 224 x 224 natural-spectrum images, [2, 3, ...]."""
    images, _ = labelled_images(1, size=(224, 224), seed=5, num_classes=2)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    u, s, v = RankEngine("gram64", "cpu").materialize(x, factors=64).factors
    return tuple(t.half().numpy() for t in (u, s, v))


@pytest.mark.parametrize("k", [0, 1, 17, 64])
def test_reconstruct_equals_the_float64_literal_sum(factors224, k):
    u, s, v = factors224
    ref = literal(u, s, v, k)
    got = reconstruct(torch.from_numpy(u), torch.from_numpy(s), torch.from_numpy(v), k, device="cpu")
    assert got.dtype == torch.float32 and got.shape == (2, 3, 224, 224)
    assert np.max(np.abs(got.numpy() - ref)) < 2e-6  # float32 arithmetic on [0, 1]-scale images
    exact = reconstruct(u, s, v, k, dtype=torch.float64)  # numpy input, float64 arithmetic
    assert np.max(np.abs(exact.numpy() - ref)) < 1e-12


def test_every_reader_goes_through_the_same_reconstruction(factors224):
    u, s, v = (t[0] for t in factors224)  # one sample [C, ...], as stored in a shard
    members = {}
    for name, arr in (("u.npy", u), ("s.npy", s), ("v.npy", v)):
        buf = io.BytesIO()
        np.save(buf, arr)
        members[name] = buf.getvalue()
    members["cls"] = b"1"
    batch = reconstruct(u, s, v, 17).numpy()
    image, label = decode_sample(members, "factors", 17)                   # the loaders' per-sample decoder
    assert label == 1 and image.shape == (224, 224, 3)
    np.testing.assert_array_equal(image, batch.transpose(1, 2, 0))
    np.testing.assert_array_equal(decode_image(members), reconstruct_numpy(u, s, v).transpose(1, 2, 0))  # verify, preview
    raw, _ = decode_sample(members, "factors", 17, unreconstructed=True)
    assert [a.shape for a in raw] == [(3, 224, 17), (3, 17), (3, 224, 17)] and raw[0].dtype == np.float16


def test_reconstruct_refuses_ranks_and_shapes_it_cannot_have(factors224):
    u, s, v = factors224
    with pytest.raises(ValueError, match="only 64 components"):
        reconstruct(u, s, v, 65)
    with pytest.raises(ValueError, match="do not fit together"):
        reconstruct(u[..., :10], s, v)


@pytest.mark.gpu
def test_reconstruct_on_cuda_matches_the_float64_literal_sum(factors224):
    u, s, v = (torch.from_numpy(t) for t in factors224)
    for k in (1, 17, 64):
        got = reconstruct(u, s, v, k, device="cuda")  # float16 moved to the GPU, float32 arithmetic there
        assert got.device.type == "cuda"
        assert np.max(np.abs(got.cpu().numpy() - literal(u, s, v, k))) < 2e-5  # TF32, if a caller enabled it: ~1e-3
        on_gpu = reconstruct(*(t.cuda() for t in (u, s, v)), k)  # already on the device: stays there
        assert on_gpu.device.type == "cuda"


# -- the loader, end to end on real shards ------------------------------------------------------------


@pytest.fixture(scope="module")
def info():
    return open_variant(built_root(), "cifar10", "train", "factors-006")


def _stored(info) -> dict:
    """Independent read of the factors members: tarfile -> {key: (u, s, v)} float16."""
    out = {}
    for url in info.urls:
        with tarfile.open(url) as tar:
            members = {}
            for m in tar:
                key, _, ext = m.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for key, mm in members.items():
            out[key] = tuple(np.load(io.BytesIO(mm[n])) for n in ("u.npy", "s.npy", "v.npy"))
    return out


def _epoch(info, **kw):
    return list(eval_loader(info, LoaderConfig(batch_size=16, factors_k=SMALL_K, **kw)))


def test_loader_reconstructs_factors_at_k_below_K_wherever_asked(info):
    stored = _stored(info)
    workers = _epoch(info, workers=0, reconstruct_on="workers")
    assert sum(len(b) for b in workers) == info.num_samples
    for b in workers:
        assert b.factors is None and b.x.shape == (len(b), 3, 32, 32) and b.x.dtype == torch.float32
        for key, x in zip(b.keys, b.x):
            assert np.max(np.abs(x.numpy() - literal(*stored[key], SMALL_K))) < 2e-6
    # after the transfer (here the main process: no GPU), with DataLoader worker processes shipping float16 factors
    device = _epoch(info, workers=2, reconstruct_on="device")
    assert [b.keys for b in device] == [b.keys for b in workers]
    for a, b in zip(workers, device):
        torch.testing.assert_close(b.x, a.x, rtol=0, atol=1e-6)
    # handed out: the caller reconstructs, at the loader's k or any smaller one
    handed = _epoch(info, workers=0, reconstruct_on="none")
    for a, b in zip(workers, handed):
        assert b.x is None and isinstance(b.factors, Factors)
        assert b.factors.u.shape == (len(b), 3, 32, SMALL_K) and b.factors.s.dtype == torch.float16
        torch.testing.assert_close(reconstruct(*b.factors), a.x, rtol=0, atol=1e-6)
        for key, x1 in zip(b.keys, reconstruct(*b.factors, k=1)):
            assert np.max(np.abs(x1.numpy() - literal(*stored[key], 1))) < 2e-6


def test_training_augmentation_is_the_same_wherever_factors_are_reconstructed(info):
    def epoch(where):
        cfg = LoaderConfig(batch_size=16, workers=0, augment="cifar", factors_k=SMALL_K, reconstruct_on=where)
        return list(train_loader(info, cfg, epoch=1, rank=0, world_size=1))

    for a, b in zip(epoch("workers"), epoch("device")):
        assert a.keys == b.keys
        torch.testing.assert_close(b.x, a.x, rtol=0, atol=1e-6)


@pytest.mark.gpu
def test_loader_reconstructs_factors_on_the_gpu(info):
    cpu = _epoch(info, workers=0, reconstruct_on="workers")
    gpu = _epoch(info, workers=0, device="cuda")  # auto: the float16 factors cross the bus, the GPU multiplies
    handed = _epoch(info, workers=0, device="cuda", reconstruct_on="none")
    for a, b, c in zip(cpu, gpu, handed):
        assert b.x.device.type == "cuda" and c.factors.u.device.type == "cuda"
        torch.testing.assert_close(b.x.cpu(), a.x, rtol=0, atol=2e-5)
        torch.testing.assert_close(reconstruct(*c.factors).cpu(), a.x, rtol=0, atol=2e-5)


def test_reconstruct_on_is_checked_and_names_the_fix(info):
    with pytest.raises(LoaderError, match="reconstruct_on='gpu'"):
        LoaderConfig(reconstruct_on="gpu")
    with pytest.raises(LoaderError, match="augment='cifar' cannot apply"):
        train_loader(info, LoaderConfig(augment="cifar", reconstruct_on="none"), rank=0, world_size=1)
    png = open_variant(built_root(), "cifar10", "train", "rank-005")
    with pytest.raises(LoaderError, match="factors-K variants only"):
        eval_loader(png, LoaderConfig(reconstruct_on="device"))


def test_an_all_skipped_factors_batch_keeps_its_shapes():
    from rankshard.loaders.pipeline import collate

    x, y, keys, errors = collate([("s.tar", "00000001", None, "unreadable")], "factors", 4, "skip", (32, 32))
    assert x.shape == (0, 3, 32, 32) and len(y) == 0 and len(errors) == 1
    f, *_ = collate([("s.tar", "00000001", None, "unreadable")], "factors", 4, "skip", (32, 32), factors_out=True)
    assert f.u.shape == (0, 3, 32, 4) and f.s.shape == (0, 3, 4) and f.v.shape == (0, 3, 32, 4)
