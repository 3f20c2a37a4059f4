"""The rank spectrum, the paper's Algorithm 1: accuracy as a function of input rank.

For each image: ONE SVD per channel (``RankEngine.decompose``); every requested rank k is then rebuilt from
those factors on the fly (``RankEngine.reconstruct``, incremental) and the rank-k images of several ranks are
stacked into one forward pass. Per k we record the prediction, scored against the label (top-1) and against
the model's prediction on the full-rank image (agreement, Algorithm 1's ``rank_k_acc``).

Modes (SPEC rank semantics): ``low`` feeds ``x_k`` (k largest singular values kept), ``high`` feeds
``x - x_k`` (k largest removed, paper section 5.1). Images are NOT clipped to [0, 1]: Algorithm 1 feeds the
reconstruction as is (the model normalizes inside). k = 0 is exactly zeros, k >= n exactly ``x`` (SPEC),
so the full-rank point of the spectrum is the plain accuracy bit for bit.

Frequency modes (issue 16): ``lowpass`` feeds the k x k lowest 2-D DFT frequencies of each channel, ``highpass``
the rest (``preprocess.rank.lowpass``, exact definition there). No SVD: a fixed filter per k, so the paper's
question -- is rank truncation the same as frequency truncation? -- is answered by running both modes.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rankshard.preprocess.rank.engine import RankEngine
from rankshard.preprocess.rank.lowpass import highpass, lowpass

from rankshard.evaluate.accuracy import predict
from rankshard.evaluate.errors import EvaluationError

# How the model input is formed from the image x and its low-rank reconstruction x_k.
MODES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "low": lambda x, xk: xk,
    "high": lambda x, xk: x - xk,
}
# Modes that truncate frequencies instead of singular values: the model input for window k, from x alone.
FREQUENCY_MODES: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {"lowpass": lowpass, "highpass": highpass}


def _parse_item(item: str, n: int) -> list[int]:
    if item == "all":
        return list(range(n + 1))
    parts = item.split(":")
    try:
        if len(parts) == 1:
            return [int(item)]
        if len(parts) in (2, 3):
            start, stop = int(parts[0] or 0), int(parts[1]) if parts[1] else n
            step = int(parts[2]) if len(parts) == 3 else 1
            if step < 1:
                raise ValueError
            return list(range(start, stop + 1, step))  # inclusive: "0:32" covers rank 32 (the full image)
    except ValueError:
        pass
    raise EvaluationError(f"--ranks {item!r}: write 'all', a list '0,5,10', or an inclusive range 'A:B' / 'A:B:STEP'")


def parse_ranks(text: str, n: int) -> tuple[int, ...]:
    """``"all"`` -> 0..n, ``"0:32"`` -> 0..32 inclusive, ``"0:224:8"``, ``"1,5,10"`` (mixable with commas).

    ``n = min(H, W)`` of the images; a rank outside 0..n is an error, not a silently clamped value.
    """
    ranks = sorted({k for item in text.replace(" ", "").split(",") if item for k in _parse_item(item, n)})
    if not ranks:
        raise EvaluationError(f"--ranks {text!r} selects no rank")
    bad = [k for k in ranks if not 0 <= k <= n]
    if bad:
        raise EvaluationError(f"--ranks: rank {bad[0]} is outside the image: images of this data have rank "
                              f"0..{n} (n = min(H, W)); use e.g. --ranks 0:{n} or --ranks all")
    return tuple(ranks)


@dataclass(frozen=True)
class SpectrumConfig:
    """Algorithm 1's settings: ranks to evaluate, ``low``/``high`` mode, images per forward pass."""

    ranks: tuple[int, ...]
    mode: str = "low"
    forward_batch: int = 256  # rank-k images per model call: ranks are grouped so that B * group <= this

    def __post_init__(self) -> None:
        if self.mode not in MODES and self.mode not in FREQUENCY_MODES:
            raise EvaluationError(f"--mode {self.mode!r}: choose one of {sorted(MODES) + sorted(FREQUENCY_MODES)}")
        if not self.ranks or min(self.ranks) < 0:
            raise EvaluationError(f"spectrum ranks must be a non-empty list of ranks >= 0, got {self.ranks}")
        if self.forward_batch < 1:
            raise EvaluationError("--forward-batch must be >= 1")


def _rank_groups(ranks: Sequence[int], batch: int, forward_batch: int) -> list[list[int]]:
    per_call = max(1, forward_batch // max(batch, 1))
    return [list(ranks[i:i + per_call]) for i in range(0, len(ranks), per_call)]


def rank_inputs(x: torch.Tensor, engine: RankEngine, cfg: SpectrumConfig) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield ``(ranks, inputs)``: the model inputs for a group of ranks, ``[len(ranks) * B, C, H, W]``.

    One decomposition of ``x`` serves every group; each group is reconstructed from it when needed, so memory
    holds one group of rank-k images, never all ranks.
    """
    if cfg.mode in FREQUENCY_MODES:
        yield from _frequency_inputs(x, cfg)
        return
    n = min(x.shape[-2:])
    inner = [k for k in cfg.ranks if 0 < k < n]
    dec = engine.decompose(x, kmax=max(inner)) if inner else None
    for group in _rank_groups(cfg.ranks, len(x), cfg.forward_batch):
        need = [k for k in group if 0 < k < n]
        rec = engine.reconstruct(dec, need) if need else {}
        # k = 0 and k >= n are exact by definition (zeros, x): no float32 reconstruction error at the ends.
        low = [torch.zeros_like(x) if k == 0 else x if k >= n else rec[k].to(x.dtype) for k in group]
        yield group, torch.cat([MODES[cfg.mode](x, xk) for xk in low])


def _frequency_inputs(x: torch.Tensor, cfg: SpectrumConfig) -> Iterator[tuple[list[int], torch.Tensor]]:
    """``rank_inputs`` for the frequency modes: each window k filtered directly (k = 0 and k >= n exact)."""
    for group in _rank_groups(cfg.ranks, len(x), cfg.forward_batch):
        yield group, torch.cat([FREQUENCY_MODES[cfg.mode](x, k) for k in group])


@torch.no_grad()
def spectrum_batch(model: nn.Module, x: torch.Tensor, engine: RankEngine, cfg: SpectrumConfig
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions on the full-rank images [B] and on each rank's images [B, len(cfg.ranks)]."""
    full = predict(model, x).argmax(1)
    preds = []
    for group, inputs in rank_inputs(x, engine, cfg):
        preds.append(predict(model, inputs, cfg.forward_batch).argmax(1).view(len(group), len(x)))
    return full, torch.cat(preds).T


def spectrum_records(model: nn.Module, batches: Iterable, engine: RankEngine, cfg: SpectrumConfig,
                     device: str) -> dict[str, dict]:
    """``{key: {"label", "full", "preds": [pred at each of cfg.ranks]}}`` for every sample of ``batches``."""
    records: dict[str, dict] = {}
    for batch in batches:
        x = batch.x.to(device, torch.float32)
        full, preds = spectrum_batch(model, x, engine, cfg)
        for key, label, f, p in zip(batch.keys, batch.y.tolist(), full.tolist(), preds.tolist()):
            records[key] = {"label": label, "full": f, "preds": p}
    return records


def summarize_spectrum(records: Mapping[str, dict], ranks: Sequence[int]) -> list[dict]:
    """Rows ``{"rank", "top1", "agreement", "count"}``: top-1 vs labels and agreement with the full-rank
    prediction at each rank, as fractions of the ``count`` evaluated samples."""
    labels = torch.tensor([r["label"] for r in records.values()])
    full = torch.tensor([r["full"] for r in records.values()])
    preds = torch.tensor([r["preds"] for r in records.values()]).reshape(len(labels), len(ranks))
    n = max(len(labels), 1)
    top1 = (preds == labels[:, None]).sum(0).tolist()
    agree = (preds == full[:, None]).sum(0).tolist()
    return [{"rank": k, "top1": t / n, "agreement": a / n, "count": len(labels)}
            for k, t, a in zip(ranks, top1, agree)]
