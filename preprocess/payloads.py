"""The numeric chain of one batch: one SVD pass, then every variant's stored arrays and what storing lost.

``variant_payloads`` turns uint8 NHWC images into, per variant, the array to encode (uint8 for png/raw,
float16 for npy, factors), its energy retained, clip fraction and quantization leak (SPEC). It runs on
whatever device the engine uses: in the main process when that is a GPU, inside each worker process on CPU
(``preprocess.shardtask``), with the same code either way, so where it ran never changes a byte.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from rankshard.preprocess.format.variants import Variant
from rankshard.preprocess.rank.engine import RankEngine, RankOutputs, energy_retained
from rankshard.preprocess.rank.lowpass import energy_kept, highpass, lowpass


def _to_hwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1).contiguous()


def _stored_png(xk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = (xk * 255).round_().clamp_(0, 255)  # = round(255 * clip(x, 0, 1)): 0 and 255 are integers
    flat = xk.flatten(1)
    # The mask's bytes read as uint8 (a view, no copy) and summed into int32: a bool tensor's sum(1) widens
    # to int64 element by element and took ~10x as long (26 ms per 30 images at 224x224 on one thread, a third
    # of the SVD-free numeric stage). Same counts; int32 holds 2^31 pixels x channels (715 MP of RGB, while
    # --max-pixels refuses more than 89 MP by default).
    clipped = ((flat < 0) | (flat > 1)).view(torch.uint8).sum(1, dtype=torch.int32) / flat.shape[1]
    return q.to(torch.uint8), q.div_(255), clipped


def _stored_npy(xk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    half = xk.half()  # float16 keeps negative and > 1 values: nothing is clipped
    return half, half.float(), torch.zeros(len(xk), device=xk.device)


# encoding -> (array to store, what a reader gets back on the [0, 1] scale, share of clipped pixels)
STORAGE = {"png": _stored_png, "npy": _stored_npy, "raw": _stored_png}  # raw: PNG's pixels, uncompressed


def _quantized(xk: torch.Tensor, encoding: str) -> dict:
    """Stored form of a reconstruction plus what storing it lost (SPEC: clip_fraction and leak)."""
    image, stored, clipped = STORAGE[encoding](xk)
    leak = stored.sub_(xk).flatten(1).norm(dim=1) / xk.flatten(1).norm(dim=1).clamp_min(1e-12)
    return {"image": _to_hwc(image), "clip_fraction": clipped, "leak": leak}


@dataclass
class _Batch:
    """One decomposed batch: the stored originals, their float version and the engine's outputs."""

    images: np.ndarray
    x: torch.Tensor
    out: object

    def energy(self, k: int) -> torch.Tensor:
        return energy_retained(self.out.spectra, [k])[..., 0]

    def lossless(self, **arrays) -> dict:
        n = len(self.images)
        return {"clip_fraction": np.zeros(n), "leak": np.zeros(n), "energy": np.ones((n, self.x.shape[1])), **arrays}


def _full(v: Variant, b: _Batch) -> dict:
    if v.encoding in ("png", "raw"):
        return b.lossless(image=b.images)
    return {**_quantized(b.x, "npy"), "energy": b.lossless()["energy"]}


def _low(v: Variant, b: _Batch) -> dict:
    return {**_quantized(b.out.low[v.rank], v.encoding), "energy": b.energy(v.rank)}


def _high(v: Variant, b: _Batch) -> dict:
    # energy of x - x_k is the share of the squared singular values beyond k
    return {**_quantized(b.out.high[v.rank], "npy"), "energy": 1.0 - b.energy(v.rank)}


def _factors(v: Variant, b: _Batch) -> dict:
    u, s, vv = (t.half() for t in b.out.factors)
    return {**b.lossless(u=u, s=s, v=vv), "energy": b.energy(v.rank)}


def _spectra(v: Variant, b: _Batch) -> dict:
    return b.lossless(s=b.out.spectra.float())


def _lowpass(v: Variant, b: _Batch) -> dict:
    # frequency truncation needs no SVD: a fixed real filter per axis (preprocess.rank.lowpass)
    xk = lowpass(b.x, v.rank)
    return {**_quantized(xk, v.encoding), "energy": energy_kept(b.x, xk)}


def _highpass(v: Variant, b: _Batch) -> dict:
    xk = highpass(b.x, v.rank)
    return {**_quantized(xk, "npy"), "energy": energy_kept(b.x, xk)}


PAYLOAD_BUILDERS = {"full": _full, "low": _low, "high": _high, "factors": _factors, "spectra": _spectra,
                    "lowpass": _lowpass, "highpass": _highpass}


class NullEngine:
    """Backend ``none``: a benchmarking baseline that runs the whole pipeline without any SVD.

    Low-rank variants receive copies of the image, high-rank zeros, spectra and factors ones: the same
    arrays flow through quantization, encoding and writing, so only the SVD's cost is missing. Its
    output is NOT rank-k data (the manifest's ``svd.backend`` says ``none``).
    """

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    def describe(self) -> dict:
        return {"backend": "none", "device": str(self.device), "dtype": "none",
                "note": "SVD disabled (benchmark baseline): variants are copies, not rank-k"}

    def materialize(self, x, low=(), high=(), factors=None, spectra=False) -> RankOutputs:
        n, c, h, w = x.shape
        ones = torch.ones(n, c, min(h, w), device=x.device)
        f = None if factors is None else tuple(torch.ones(*shape, device=x.device) for shape in
                                               ((n, c, h, factors), (n, c, factors), (n, c, w, factors)))
        return RankOutputs({k: x.clone() for k in low}, {k: torch.zeros_like(x) for k in high},
                           ones if spectra else None, f)


def variant_payloads(engine: RankEngine, variants: list[Variant], images: np.ndarray) -> dict[str, dict]:
    """Run one decomposition over ``images`` (uint8 NHWC) and build every variant's arrays."""
    x = torch.from_numpy(images).to(engine.device).permute(0, 3, 1, 2).float() / 255
    out = engine.materialize(
        x,
        low=[v.rank for v in variants if v.mode == "low"],
        high=[v.rank for v in variants if v.mode == "high"],
        factors=next((v.rank for v in variants if v.mode == "factors"), None),
        spectra=True,
    )
    batch = _Batch(images, x, out)
    return to_host({v.name: PAYLOAD_BUILDERS[v.mode](v, batch) for v in variants})


def to_host(payloads: dict[str, dict]) -> dict[str, dict]:
    """Every tensor of a batch's payloads as a numpy array, in one transfer.

    On a GPU each copy is issued non-blocking (torch stages device-to-host copies through pinned memory),
    then one synchronization waits for them all, instead of a blocking round trip per array (several per
    variant). On CPU the arrays are views of the tensors, nothing is copied.
    """
    host = {name: {key: t.to("cpu", non_blocking=True) if torch.is_tensor(t) else t for key, t in arrays.items()}
            for name, arrays in payloads.items()}
    # each device the copies came from (synchronize() alone waits for the *current* device only: cuda:0
    # unless someone called set_device, while a torchrun rank or --device cuda:1 computes elsewhere)
    for device in {t.device for arrays in payloads.values() for t in arrays.values() if torch.is_tensor(t) and t.is_cuda}:
        torch.cuda.synchronize(device)
    return {name: {key: t.numpy() if torch.is_tensor(t) else t for key, t in arrays.items()}
            for name, arrays in host.items()}


def concat_payloads(parts: list[dict[str, dict]]) -> dict[str, dict]:
    if len(parts) == 1:
        return parts[0]
    return {name: {k: np.concatenate([p[name][k] for p in parts]) for k in parts[0][name]} for name in parts[0]}


def empty_payloads(variants: list[Variant], size: tuple[int, int]) -> dict[str, dict]:
    """Payloads of a shard whose every input was skipped: zero-length arrays of the right shapes."""
    h, w = size
    base = {"energy": np.zeros((0, 3)), "clip_fraction": np.zeros(0), "leak": np.zeros(0)}
    arrays = {"png": {"image": np.zeros((0, h, w, 3), np.uint8)}, "raw": {"image": np.zeros((0, h, w, 3), np.uint8)},
              "npy": {"image": np.zeros((0, h, w, 3), np.float16)},
              "factors": {"u": np.zeros((0, 3, h, 1)), "s": np.zeros((0, 3, 1)), "v": np.zeros((0, 3, w, 1))},
              "spectra": {"s": np.zeros((0, 3, min(h, w)))}}
    return {v.name: {**base, **arrays[v.encoding]} for v in variants}


def make_engine(backend: str, device: str | torch.device = "cpu"):
    """The engine for a resolved backend name (``none``: the SVD-free benchmark baseline)."""
    return NullEngine(device) if backend == "none" else RankEngine(backend, device)


@functools.lru_cache(maxsize=4)
def worker_engine(backend: str):
    """One engine per worker process and backend (created on the first shard, reused for the rest).

    ``backend`` is the name the main process resolved (never ``auto``): calibrating again in every worker
    could pick differently on a loaded machine, and the shards must not depend on which process made them.
    """
    return make_engine(backend, "cpu")
