"""Frequency truncation (preprocess.rank.lowpass) against a literal numpy FFT implementation, and the rank bound."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rankshard.preprocess.rank.lowpass import highpass, lowpass, lowpass_matrix, numeric_rank, rank_check


def _keep_weight(f: int, n: int, k: int) -> tuple[bool, bool]:
    """(kept whole, is the even-k ±k/2 pair) for DFT index f (0..n-1) along an axis: the documented definition."""
    signed = f if f <= n // 2 else f - n
    if k >= n:
        return True, False
    if k % 2:
        return abs(signed) <= (k - 1) // 2, False
    if k == 0:
        return False, False
    if abs(signed) <= k // 2 - 1:
        return True, False
    return False, abs(signed) == k // 2


def _axis_filter(spec: np.ndarray, k: int, axis: int) -> np.ndarray:
    """Literal per-axis frequency operation: zero what is not kept, average the ±k/2 pair (its cos half)."""
    n = spec.shape[axis]
    out = np.zeros_like(spec)
    for f in range(n):
        whole, pair = _keep_weight(f, n, k)
        src = np.take(spec, f, axis=axis)
        if pair:
            src = (np.take(spec, (k // 2) % n, axis=axis) + np.take(spec, (-k // 2) % n, axis=axis)) / 2
        if whole or pair:
            idx = [slice(None)] * spec.ndim
            idx[axis] = f
            out[tuple(idx)] = src
    return out


def reference_lowpass(x: np.ndarray, k: int) -> np.ndarray:
    """fft2 per channel, keep the k x k lowest frequencies literally, ifft2, real part."""
    out = np.empty_like(x, dtype=np.float64)
    for c in range(x.shape[0]):
        spec = np.fft.fft2(x[c].astype(np.float64))
        spec = _axis_filter(_axis_filter(spec, k, 0), k, 1)
        back = np.fft.ifft2(spec)
        assert np.abs(back.imag).max() < 1e-9  # the definition keeps the output real
        out[c] = back.real
    return out


def natural_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """1/f noise (steep spectral decay, like photos; SPEC warns uniform noise hides errors), in [0, 1]."""
    rng = np.random.default_rng(seed)
    fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")
    amp = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / max(h, w))
    img = np.stack([np.fft.ifft2(amp * np.exp(2j * np.pi * rng.random((h, w)))).real for _ in range(3)])
    return (img - img.min()) / (img.max() - img.min())


@pytest.mark.parametrize("h,w", [(32, 32), (17, 24), (9, 9)])
@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, 5, 8, 9, 16, 31, 32, 40])
def test_lowpass_equals_literal_fft(h, w, k):
    x = natural_image(h, w, seed=k)
    got = lowpass(torch.from_numpy(x), k).numpy()
    np.testing.assert_allclose(got, reference_lowpass(x, k), atol=1e-6, rtol=0)
    # float32 input goes through the same float64 filter
    got32 = lowpass(torch.from_numpy(x).float(), k).numpy()
    np.testing.assert_allclose(got32, reference_lowpass(x, k), atol=1e-6, rtol=0)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6, 7, 10, 15, 20, 31])
def test_rank_of_lowpass_is_at_most_k(k):
    x = natural_image(32, 32, seed=100 + k)
    ranks = numeric_rank(lowpass(torch.from_numpy(x), k).numpy())
    assert ranks.shape == (3,) and (ranks <= k).all()
    assert (ranks == k).all()  # a generic image fills the whole k-dimensional window: the bound is tight


def test_lowpass_ends_and_projection_properties():
    x = torch.from_numpy(natural_image(12, 20, seed=5))
    assert torch.equal(lowpass(x, 0), torch.zeros_like(x))
    torch.testing.assert_close(lowpass(x, 20), x, atol=1e-12, rtol=0)
    for k in (3, 4):
        lo, hi = lowpass(x, k), highpass(x, k)
        torch.testing.assert_close(lo + hi, x)
        # orthogonal projection: idempotent, and energies of the two parts add up per channel
        torch.testing.assert_close(lowpass(lo, k), lo, atol=1e-12, rtol=0)
        torch.testing.assert_close(lo.pow(2).sum((1, 2)) + hi.pow(2).sum((1, 2)), x.pow(2).sum((1, 2)))
        mat = lowpass_matrix(12, k)
        np.testing.assert_allclose(mat, mat.T, atol=1e-12)
        assert np.linalg.matrix_rank(mat) == k


def test_rank_check_reports_the_bound():
    x = torch.from_numpy(natural_image(16, 16, seed=9))[None].repeat(2, 1, 1, 1)
    rows = rank_check(x, [2, 5])
    assert [r["k"] for r in rows] == [2, 5] and all(r["bound_holds"] for r in rows)
    assert rows[1]["max_rank"] == [5, 5, 5] and rows[0]["images"] == 2


# -- materialized in the same pass as the rank variants ------------------------------------------------------

def test_materialize_frequency_variants_same_pass(tmp_path):
    import json

    from rankshard.preprocess.format.codec import decode_image
    from rankshard.preprocess.format.tarindex import read_shard
    from rankshard.preprocess.pipeline import ArraySource, materialize_split
    from rankshard.preprocess.sources.synth import labelled_images
    from rankshard.preprocess.spec import ShardSpec
    from rankshard.preprocess.verify import verify_tree

    images, labels = labelled_images(3, seed=0)
    info = {"kind": "test", "path": "memory", "fingerprint": "synth-lp", "checksum_verified": False}
    src = ArraySource(images, labels, [f"mem:{i}" for i in range(len(labels))], tuple("abcdefghij"), info)
    base = dict(dataset="cifar10", split="test", ranks=(4,), shard_size=16, workers=0, shuffle=False)
    materialize_split(src, ShardSpec(**base, lowpass=(4, 7), highpass=(4,)), tmp_path, show_progress=False)
    split = tmp_path / "cifar10" / "test"
    assert {"lowpass-004", "lowpass-007", "highpass-004", "rank-004"} <= {p.name for p in split.iterdir()}
    m = json.loads((split / "highpass-004" / "manifest.json").read_text())
    assert (m["mode"], m["rank"], m["encoding"]) == ("highpass", 4, "npy")
    assert m["config"]["lowpass"] == [4, 7]
    assert verify_tree(tmp_path).ok  # includes the float64 reference check of the frequency variants
    full = dict(read_shard(split / "full" / "test-000000.tar"))
    low = dict(read_shard(split / "lowpass-007" / "test-000000.tar"))
    key = next(iter(full))
    x = decode_image(full[key]).transpose(2, 0, 1).astype(np.float64)
    ref = np.clip(reference_lowpass(x, 7), 0, 1)
    assert np.abs(decode_image(low[key]).transpose(2, 0, 1) - ref).max() <= 0.5 / 255 + 1e-6


def test_spec_without_frequency_variants_keeps_its_config_hash():
    from rankshard.preprocess.spec import ShardSpec

    cfg = ShardSpec("cifar10", "train").hashed_config({"fingerprint": "f"})
    assert "lowpass" not in cfg and "highpass" not in cfg
    assert ShardSpec("cifar10", "train", lowpass=(3,)).hashed_config({"fingerprint": "f"})["lowpass"] == [3]
