"""The rank engine against the float64 numpy reference (Algorithm 1 literally) on natural-spectrum images."""
import numpy as np
import pytest
import torch

from rankshard.preprocess.rank.engine import (
    ACCURACY_BAR,
    BACKENDS,
    Decomposition,
    RankEngine,
    available_backends,
    calibrate,
    energy_retained,
    reference_low_rank,
)
from rankshard.preprocess.sources.synth import natural_batch

BAR_RANKS = (0, 1, 5, 10, 30, 50, 100)
CPU_EXACT = ["numpy", "torch", "gram64"]
GPU_EXACT = ["torch", "torch-gesvd", "torch-gesvda", "torch-gesvdj", "gram64", "cupy"]


def _all_ranks(n: int) -> list[int]:
    """The bar's ranks clipped to n, plus full rank."""
    return sorted({min(k, n) for k in BAR_RANKS} | {n})


def _literal_low_rank(a: np.ndarray, k: int) -> np.ndarray:
    """x_k of one matrix by the textbook sum of k outer products (independent of the engine's code)."""
    u, s, vh = np.linalg.svd(a)
    return sum((s[j] * np.outer(u[:, j], vh[j]) for j in range(k)), np.zeros_like(a))


@pytest.fixture(scope="module")
def small():
    return natural_batch(4, size=(32, 32), seed=3)


@pytest.fixture(scope="module")
def large():
    return natural_batch(1, size=(224, 224), seed=5)


def _references(x: np.ndarray, ranks) -> dict[int, np.ndarray]:
    """float64 numpy x_k for many ranks from one np.linalg.svd per channel (reference_low_rank does one per k)."""
    u, s, vh = np.linalg.svd(x, full_matrices=False)
    return {k: (u[..., :k] * s[..., None, :k]) @ vh[..., :k, :] for k in ranks}


@pytest.fixture(scope="module")
def small_ref(small):
    return _references(small, _all_ranks(32))


@pytest.fixture(scope="module")
def large_ref(large):
    return _references(large, _all_ranks(224))


def _max_err(got: dict, ref: dict) -> float:
    return max(float(np.abs(got[k].double().cpu().numpy() - ref[k]).max()) for k in ref)


def test_reference_matches_literal_outer_product_sum(small, small_ref):
    ref = reference_low_rank(small[:1], 7)
    for c in range(3):
        np.testing.assert_allclose(ref[0, c], _literal_low_rank(small[0, c], 7), atol=1e-12)
    np.testing.assert_allclose(reference_low_rank(small[:1], 32), small[:1], atol=1e-12)
    for k in (0, 5, 30):
        np.testing.assert_allclose(reference_low_rank(small, k), small_ref[k], atol=1e-12)


@pytest.mark.parametrize("backend", CPU_EXACT)
def test_low_rank_meets_bar_32(backend, small, small_ref):
    out = RankEngine(backend, "cpu").low_rank(torch.from_numpy(small).float(), list(small_ref))
    assert all(v.dtype == torch.float32 and v.shape == small.shape for v in out.values())
    assert _max_err(out, small_ref) <= ACCURACY_BAR


@pytest.mark.parametrize("backend", CPU_EXACT)
def test_low_rank_meets_bar_224(backend, large, large_ref):
    out = RankEngine(backend, "cpu").low_rank(torch.from_numpy(large), list(large_ref))
    assert _max_err(out, large_ref) <= ACCURACY_BAR


@pytest.mark.parametrize("backend", CPU_EXACT)
def test_high_rank_is_x_minus_low(backend, small, small_ref):
    x = torch.from_numpy(small)
    out = RankEngine(backend, "cpu").high_rank(x, list(small_ref))
    assert _max_err(out, {k: small - v for k, v in small_ref.items()}) <= ACCURACY_BAR
    assert out[0].min() >= 0 and (out[10] < 0).any()  # high rank 0 is x; others go negative


def test_rank_zero_and_full_are_exact(small):
    x = torch.from_numpy(small).float()
    out = RankEngine("gram64", "cpu").materialize(x, low=[0, 32, 99], high=[0, 32, 99])
    assert torch.equal(out.low[0], torch.zeros_like(x))
    assert torch.equal(out.low[32], x) and torch.equal(out.low[99], x)
    assert out.low[32].data_ptr() != x.data_ptr()  # a copy, not the caller's tensor
    assert torch.equal(out.high[0], x)
    assert torch.equal(out.high[32], torch.zeros_like(x))


@pytest.mark.parametrize("backend", CPU_EXACT)
@pytest.mark.parametrize("size", [(40, 24), (24, 40)])
def test_non_square(backend, size):
    x = natural_batch(2, size=size, seed=11)
    ranks = [0, 1, 5, 10, 23, 24, 30]
    out = RankEngine(backend, "cpu").materialize(torch.from_numpy(x), low=ranks, high=ranks, factors=6, spectra=True)
    assert _max_err(out.low, {k: reference_low_rank(x, k) for k in ranks}) <= ACCURACY_BAR
    assert _max_err(out.high, {k: x - reference_low_rank(x, k) for k in ranks}) <= ACCURACY_BAR
    assert out.spectra.shape == (2, 3, 24)
    u, s, v = out.factors
    assert u.shape == (2, 3, size[0], 6) and s.shape == (2, 3, 6) and v.shape == (2, 3, size[1], 6)


@pytest.mark.parametrize("backend", CPU_EXACT + ["randomized"])
def test_spectra_match_numpy(backend, small):
    out = RankEngine(backend, "cpu").materialize(torch.from_numpy(small), low=[5], spectra=True)
    ref = np.linalg.svd(small, compute_uv=False)
    assert out.spectra.dtype == torch.float32 and out.spectra.shape == (4, 3, 32)
    np.testing.assert_allclose(out.spectra.numpy(), ref, atol=1e-4, rtol=1e-5)


def test_spectra_alone_need_no_factors(small):
    out = RankEngine("gram64", "cpu").materialize(torch.from_numpy(small), spectra=True)
    np.testing.assert_allclose(out.spectra.numpy(), np.linalg.svd(small, compute_uv=False), atol=1e-5)
    assert out.low == {} and out.high == {} and out.factors is None


@pytest.mark.parametrize("backend", CPU_EXACT)
def test_factors_reconstruct_and_are_orthonormal(backend, small, small_ref):
    k = 10
    u, s, v = RankEngine(backend, "cpu").materialize(torch.from_numpy(small), factors=k).factors
    assert u.shape == (4, 3, 32, k) and s.shape == (4, 3, k) and v.shape == (4, 3, 32, k)
    xk = (u.double() * s.double()[..., None, :]) @ v.double().mT
    np.testing.assert_allclose(xk.numpy(), small_ref[10], atol=ACCURACY_BAR)
    eye = torch.eye(k, dtype=torch.float64)
    assert torch.allclose(u.double().mT @ u.double(), eye.expand(4, 3, k, k), atol=1e-5)
    assert torch.allclose(v.double().mT @ v.double(), eye.expand(4, 3, k, k), atol=1e-5)
    assert (s[..., :-1] >= s[..., 1:]).all()


def test_factors_of_rank_deficient_channel_stay_orthonormal():
    x = torch.full((1, 1, 16, 12), 0.5)  # rank 1: every other singular value is 0
    u, s, v = RankEngine("gram64", "cpu").materialize(x, factors=4).factors
    assert torch.allclose(u[0, 0].mT @ u[0, 0], torch.eye(4), atol=1e-5)
    assert torch.allclose((u * s[..., None, :]) @ v.mT, x, atol=1e-5)


def test_decompose_and_reconstruct_incrementally(small, small_ref):
    engine = RankEngine("gram64", "cpu")
    dec = engine.decompose(torch.from_numpy(small), kmax=30)
    assert isinstance(dec, Decomposition)
    assert dec.u.shape == (4, 3, 32, 30) and dec.s.shape == (4, 3, 30) and dec.vh.shape == (4, 3, 30, 32)
    out = engine.reconstruct(dec, [30, 0, 1, 10])
    assert list(out) == [0, 1, 10, 30] and out[0].abs().max() == 0
    assert _max_err(out, {k: small_ref[k] for k in out}) <= ACCURACY_BAR
    with pytest.raises(ValueError, match="kmax >= 31"):
        engine.reconstruct(dec, [31])
    full = engine.decompose(torch.from_numpy(small))
    assert full.s.shape[-1] == 32
    assert _max_err(engine.reconstruct(full, [40]), {40: small}) <= ACCURACY_BAR


def test_kmax_truncation_keeps_top_components(small):
    engine = RankEngine("torch", "cpu")
    top = engine.decompose(torch.from_numpy(small), kmax=5)
    full = engine.decompose(torch.from_numpy(small))
    assert torch.allclose(top.s, full.s[..., :5], atol=1e-6)
    assert engine.decompose(torch.from_numpy(small), kmax=0).s.shape == (4, 3, 0)


def test_float32_and_float64_inputs_agree(small):
    engine = RankEngine("gram64", "cpu")
    a = engine.low_rank(torch.from_numpy(small), [10])[10]
    b = engine.low_rank(torch.from_numpy(small).float(), [10])[10]
    assert a.dtype == b.dtype == torch.float32
    assert (a - b).abs().max() < 1e-5


def test_three_dimensional_input(small, small_ref):
    out = RankEngine("gram64", "cpu").materialize(torch.from_numpy(small[0]), low=[5], factors=3, spectra=True)
    assert out.low[5].shape == (3, 32, 32) and out.spectra.shape == (3, 32) and out.factors[0].shape == (3, 32, 3)
    assert np.abs(out.low[5].numpy() - small_ref[5][0]).max() <= ACCURACY_BAR


def test_chunked_and_threaded_match_one_chunk(small):
    x = torch.from_numpy(small)
    one = RankEngine("gram64", "cpu", workers=1).low_rank(x, [3, 9])
    many = RankEngine("gram64", "cpu", chunk_mb=0, workers=2).low_rank(x, [3, 9])
    assert all(torch.equal(one[k], many[k]) for k in one)


def test_energy_retained_matches_formula():
    s = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    got = energy_retained(s, [0, 1, 2, 4, 9])
    ref = np.array([[0, 9 / 14, 13 / 14, 1, 1], [1, 1, 1, 1, 1]], dtype=np.float32)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6)
    assert got.shape == (2, 5)


def test_energy_retained_of_engine_spectra(small):
    spectra = RankEngine("gram64", "cpu").materialize(torch.from_numpy(small), spectra=True).spectra
    ref_s = np.linalg.svd(small, compute_uv=False)
    literal = (ref_s[..., :10] ** 2).sum(-1) / (ref_s**2).sum(-1)
    np.testing.assert_allclose(energy_retained(spectra, [10])[..., 0].numpy(), literal, atol=1e-6)


@pytest.mark.parametrize("bad", [-1, [3, -2], [1.5], ["4"]])
def test_invalid_ranks_are_refused(bad, small):
    engine = RankEngine("torch", "cpu")
    with pytest.raises(ValueError, match="rank"):
        engine.low_rank(torch.from_numpy(small), bad)


def test_invalid_inputs_and_backends_are_refused(small):
    with pytest.raises(ValueError, match="unknown SVD backend"):
        RankEngine("lapack")
    with pytest.raises(ValueError, match="x.float"):
        RankEngine("torch", "cpu").low_rank(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), [1])
    with pytest.raises(ValueError, match="NaN"):
        RankEngine("torch", "cpu").low_rank(torch.full((1, 1, 4, 4), float("nan")), [1])
    with pytest.raises(ValueError, match="needs kmax"):
        RankEngine("randomized", "cpu").decompose(torch.from_numpy(small))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="not usable"):
            RankEngine("torch-gesvdj", "cpu")


def test_randomized_is_close_with_kmax(small, small_ref):
    out = RankEngine("randomized", "cpu").low_rank(torch.from_numpy(small), [1, 5])
    assert _max_err(out, {k: small_ref[k] for k in (1, 5)}) < 1e-2  # approximate by design


def test_auto_picks_a_backend_that_meets_the_bar(small, small_ref):
    engine = RankEngine("auto", "cpu")
    assert engine.describe()["backend"] == "auto"
    out = engine.low_rank(torch.from_numpy(small), list(small_ref))
    info = engine.describe()
    assert info["backend"] in BACKENDS and BACKENDS[info["backend"]].exact
    assert info["auto"] == {"32x32": info["backend"]} and info["device"] == "cpu"
    assert _max_err(out, small_ref) <= ACCURACY_BAR
    cal = calibrate(32, 32, "cpu")
    assert cal.chosen == info["backend"] and cal.errors[cal.chosen] <= ACCURACY_BAR / 10


def test_available_backends_on_cpu():
    names = available_backends("cpu")
    assert {"numpy", "torch", "gram64", "randomized"} <= set(names)
    assert "cupy" not in names and "torch-gesvdj" not in names


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_EXACT)
@pytest.mark.parametrize("size", [32, 224])
def test_gpu_backends_meet_bar(backend, size, small, small_ref, large, large_ref):
    if backend not in available_backends("cuda"):
        pytest.skip(f"{backend} not installed")
    x, ref = (small, small_ref) if size == 32 else (large, large_ref)
    xc = torch.from_numpy(x).cuda()
    out = RankEngine(backend, "cuda").materialize(xc, low=list(ref), high=[10], spectra=True)
    assert out.low[10].device.type == "cuda"
    assert _max_err(out.low, ref) <= ACCURACY_BAR
    assert _max_err(out.high, {10: x - ref[10]}) <= ACCURACY_BAR
    np.testing.assert_allclose(out.spectra.cpu().numpy(), np.linalg.svd(x, compute_uv=False), atol=1e-4)


@pytest.mark.gpu
def test_gpu_auto_meets_bar_and_returns_to_cpu(small, small_ref):
    engine = RankEngine("auto", "cuda")
    out = engine.low_rank(torch.from_numpy(small), list(small_ref))  # CPU input, CUDA work
    assert out[10].device.type == "cpu"
    assert _max_err(out, small_ref) <= ACCURACY_BAR


@pytest.mark.slow
@pytest.mark.parametrize("backend", CPU_EXACT)
def test_low_rank_meets_bar_on_more_224_images(backend):
    x = natural_batch(6, size=(224, 224), seed=21)
    ref = _references(x, _all_ranks(224))
    assert _max_err(RankEngine(backend, "cpu").low_rank(torch.from_numpy(x), list(ref)), ref) <= ACCURACY_BAR


def test_channels_last_input_from_hwc_arrays():
    """Images decoded as HWC uint8 and permuted to NCHW are not contiguous; results must not depend on it."""
    from rankshard.preprocess.sources.synth import labelled_images

    images, _ = labelled_images(2)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    out = RankEngine("gram64", "cpu").materialize(x, low=[2, 5], high=[3], factors=4, spectra=True)
    ref = reference_low_rank(x.double().numpy(), 5)
    assert np.abs(out.low[5].double().numpy() - ref).max() < 1e-4
    high = x.double().numpy() - reference_low_rank(x.double().numpy(), 3)
    assert np.abs(out.high[3].double().numpy() - high).max() < 1e-4


def test_the_cli_lists_exactly_the_engines_backends():
    from rankshard.preprocess.options import BACKEND_CHOICES
    from rankshard.preprocess.rank import BACKEND_NAMES
    from rankshard.preprocess.rank.engine import BACKENDS

    assert BACKEND_NAMES == tuple(BACKENDS), "preprocess/rank/__init__.py must name every backend, in order"
    assert BACKEND_CHOICES == ("auto", "none", *BACKENDS)


# -- real photographs (scikit-image's bundled images) ---------------------------------------------------
# Synthetic natural batches have photo-like spectra; these are the photos themselves, at their own
# (non-square) sizes, plus the hard cases for float32: printed text and an exact checkerboard.
NATIVE_PHOTOS = ("chelsea", "text", "checkerboard",
                 *(pytest.param(n, marks=pytest.mark.slow) for n in ("astronaut", "coffee")))  # 512^2, 400x600


@pytest.mark.parametrize("name", NATIVE_PHOTOS)
def test_float64_backends_and_auto_meet_bar_on_photos_at_their_own_size(name):
    from photos import photo

    x = torch.from_numpy(photo(name)).permute(2, 0, 1)[None].float() / 255
    n = min(x.shape[-2:])
    ref = _references(x.double().numpy(), _all_ranks(n))
    chosen = calibrate(*x.shape[-2:], "cpu").chosen  # whichever auto picks here must meet the bar on a photo
    for backend in sorted({"torch", "gram64", chosen}):
        assert _max_err(RankEngine(backend, "cpu").low_rank(x, list(ref)), ref) <= ACCURACY_BAR, backend


@pytest.mark.parametrize("side", [32, 64])
def test_auto_meets_bar_on_downsampled_photos(side):
    from photos import photo_batch

    x = photo_batch(("astronaut", "camera", "coins", "page"), side)
    ref = _references(x.astype(np.float64), _all_ranks(side))
    assert _max_err(RankEngine("auto", "cpu").low_rank(torch.from_numpy(x), list(ref)), ref) <= ACCURACY_BAR
