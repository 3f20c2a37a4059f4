"""Epoch plans (pure functions of shard sizes and seeds) and the batched augmentations."""
import itertools
import math

import numpy as np
import pytest
import torch

from rankshard.loaders.augment import AUGMENTS, CIFAR_PAD, cifar, imagenet, rrc_params
from rankshard.loaders.errors import LoaderError
from rankshard.loaders.plan import EvalPlan, TrainPlan, worker_batches
from rankshard.preprocess.rank.engine import reference_low_rank
from rankshard.preprocess.sources.synth import natural_batch

SIZES = (37, 37, 37, 8, 37, 11)  # 167 samples: divides by nothing of interest


def _keys(plan, sizes):
    """Global sample ids (shard, within) of every batch of a plan, as (shard_start + within)."""
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    out = []
    for j in range(plan.steps):
        shard, within = plan.stream.locate(plan.batch_positions(j))
        out.append((starts[shard] + within).tolist())
    return out


@pytest.mark.parametrize("world,batch", [(1, 16), (2, 16), (3, 10), (4, 7), (5, 50)])
def test_eval_plan_exactly_once_and_equal_steps(world, batch):
    plans = [EvalPlan(SIZES, batch, r, world) for r in range(world)]
    assert len({p.steps for p in plans}) == 1
    seen = [k for p in plans for b in _keys(p, SIZES) for k in b]
    assert sorted(seen) == list(range(sum(SIZES)))
    assert seen == sorted(seen)  # manifest order, rank after rank


@pytest.mark.parametrize("world,batch,drop_last", [(1, 16, True), (2, 16, True), (3, 10, False), (4, 7, False),
                                                  (2, 50, False)])
def test_train_plan_partitions_the_epoch(world, batch, drop_last):
    n = sum(SIZES)
    plans = [TrainPlan(SIZES, batch, r, world, seed=3, epoch=1, shuffle_buffer=40, drop_last=drop_last)
             for r in range(world)]
    steps = plans[0].steps
    assert all(p.steps == steps for p in plans)
    assert steps == (n // (world * batch) if drop_last else math.ceil(n / (world * batch)))
    seen = [k for p in plans for b in _keys(p, SIZES) for k in b]
    assert all(len(b) == batch for p in plans for b in _keys(p, SIZES))
    if drop_last:
        assert len(set(seen)) == len(seen) == world * steps * batch  # nothing twice; n - W*Q dropped
    else:
        assert set(seen) == set(range(n)) and len(seen) - n == world * steps * batch - n  # wrap repeats


def test_train_plan_reshuffles_per_epoch_and_is_deterministic():
    a = [TrainPlan(SIZES, 16, 0, 1, seed=0, epoch=e).batch_positions(0) for e in (0, 0, 1)]
    assert np.array_equal(a[0], a[1]) and not np.array_equal(a[0], a[2])
    b = TrainPlan(SIZES, 16, 0, 1, seed=1, epoch=0).batch_positions(0)
    assert not np.array_equal(a[0], b)


def test_too_small_for_one_step_is_refused():
    with pytest.raises(LoaderError, match="drop_last=False"):
        TrainPlan((5,), 4, 0, 2)


@pytest.mark.parametrize("drop_last", [True, False])
def test_an_empty_variant_says_it_is_empty(drop_last):
    """Advice to lower batch_size or pass drop_last=False cannot help a variant with no samples."""
    for sizes in ((), (0, 0)):
        with pytest.raises(LoaderError, match="holds no samples") as err:
            TrainPlan(sizes, 4, 0, 1, drop_last=drop_last)
        assert "drop_last" not in str(err.value)


@pytest.mark.parametrize("steps,start,workers", [(10, 0, 1), (10, 3, 2), (7, 0, 3), (5, 4, 4)])
def test_worker_batches_cover_the_remaining_steps_round_robin(steps, start, workers):
    per_worker = [worker_batches(steps, start, w, workers) for w in range(workers)]
    # DataLoader takes batch start+i from worker i % workers: interleaving must give start..steps-1
    interleaved = [b for group in itertools.zip_longest(*per_worker) for b in group if b is not None]
    assert interleaved == list(range(start, steps))


# -- augmentations ---------------------------------------------------------------------------------


def _rank_k_batch(k, size=(32, 32), n=4):
    x = natural_batch(n, size=size, seed=5)
    return reference_low_rank(x, k)


def _tail_ratio(img: np.ndarray, k: int) -> float:
    """max over channels of s_{k+1} / s_1 (float64 numpy SVD)."""
    s = np.linalg.svd(img.astype(np.float64), compute_uv=False)
    return float(np.max(s[:, k] / s[:, 0]))


@pytest.mark.parametrize("name,size", [("cifar", (32, 32)), ("imagenet", (24, 24)), ("imagenet", (40, 56)),
                                        ("none", (28, 30))])
def test_augmentation_keeps_rank_at_most_k(name, size):
    k = 5
    x = torch.from_numpy(_rank_k_batch(k, size=(36, 44), n=6)).float()
    out = AUGMENTS[name](x, size, torch.Generator().manual_seed(0)).numpy()
    assert out.shape == (6, 3, *size)
    for img in out:
        assert _tail_ratio(img, k) < 1e-5  # float32 round-off only; a rank increase would be O(1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_cifar_crop_matches_a_literal_loop(dtype):
    x = torch.from_numpy(natural_batch(5, seed=2)).float()
    x = (x * 255).round().to(dtype) if dtype == torch.uint8 else x
    out = cifar(x, (32, 32), torch.Generator().manual_seed(7))
    assert out.dtype == dtype
    g = torch.Generator().manual_seed(7)  # the same draws, in the same order, applied one image at a time
    oy = torch.randint(0, 2 * CIFAR_PAD + 1, (5,), generator=g)
    ox = torch.randint(0, 2 * CIFAR_PAD + 1, (5,), generator=g)
    flip = torch.rand(5, generator=g) < 0.5
    for n in range(5):
        padded = np.zeros((3, 40, 40), x.numpy().dtype)
        padded[:, 4:36, 4:36] = x[n].numpy()
        ref = padded[:, oy[n]:oy[n] + 32, ox[n]:ox[n] + 32]
        ref = ref[:, :, ::-1] if flip[n] else ref
        assert np.array_equal(out[n].numpy(), ref)


def test_rrc_params_follow_torchvision_bounds_and_fallback():
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        i, j, h, w = rrc_params(60, 80, g)
        assert 0 <= i <= 60 - h and 0 <= j <= 80 - w
        assert 0.08 * 4800 * 0.8 <= h * w <= 4800 and 3 / 4 * 0.85 <= w / h <= 4 / 3 * 1.15  # rounding slack
    # an impossible scale exhausts the 10 attempts: central crop clamped to the ratio range
    assert rrc_params(100, 300, g, scale=(2.0, 3.0)) == (0, 83, 100, 133)
    assert rrc_params(300, 100, g, scale=(2.0, 3.0)) == (83, 0, 133, 100)
    assert rrc_params(90, 100, g, scale=(2.0, 3.0)) == (0, 0, 90, 100)


def _bilinear_up_literal(a: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear upsampling of [H, W], align_corners=False, written as a literal loop in float64."""
    h, w = a.shape
    out = np.zeros((out_h, out_w))
    for y in range(out_h):
        sy = max((y + 0.5) * h / out_h - 0.5, 0.0)
        y0, ly = int(sy), sy - int(sy)
        y1 = min(y0 + 1, h - 1)
        for x in range(out_w):
            sx = max((x + 0.5) * w / out_w - 0.5, 0.0)
            x0, lx = int(sx), sx - int(sx)
            x1 = min(x0 + 1, w - 1)
            out[y, x] = ((1 - ly) * ((1 - lx) * a[y0, x0] + lx * a[y0, x1])
                         + ly * ((1 - lx) * a[y1, x0] + lx * a[y1, x1]))
    return out


def test_resized_crop_matches_literal_bilinear():
    from rankshard.loaders.augment import resized_crop
    x = torch.from_numpy(natural_batch(1, size=(24, 24), seed=3)[0]).float()
    out = resized_crop(x, (2, 3, 10, 12), (20, 18)).numpy()
    for c in range(3):
        ref = _bilinear_up_literal(x[c, 2:12, 3:15].double().numpy(), 20, 18)
        assert np.max(np.abs(out[c] - ref)) < 1e-5


def test_imagenet_augment_stays_in_range_and_is_seeded():
    x = torch.from_numpy(natural_batch(8, size=(24, 24), seed=1)).float()
    a = imagenet(x, (16, 16), torch.Generator().manual_seed(0))
    b = imagenet(x, (16, 16), torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (8, 3, 16, 16)
    # antialiased bilinear weights are non-negative and sum to one: outputs stay within the input range
    assert a.min() >= x.min() - 1e-6 and a.max() <= x.max() + 1e-6
