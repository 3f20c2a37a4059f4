"""Top-1 / top-5 accuracy of a model on evaluation data, kept per sample so ranks can be merged by key."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Logits of ``model`` for ``x`` in [0, 1], ``batch_size`` images per forward pass (float32)."""
    return torch.cat([model(x[i:i + batch_size]).float() for i in range(0, len(x), batch_size)])


def topk_hits(logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Bool [N]: the label is among the ``k`` highest logits (k capped at the class count)."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return (top == y[:, None]).any(dim=1)


def accuracy_records(model: nn.Module, batches: Iterable, device: str) -> dict[str, dict]:
    """``{key: {"label", "pred", "top5"}}`` for every sample of ``batches`` (x, y, keys)."""
    records: dict[str, dict] = {}
    for batch in batches:
        x, y = batch.x.to(device, torch.float32), batch.y.to(device)
        logits = predict(model, x)
        pred, top5 = logits.argmax(1), topk_hits(logits, y, 5)
        for key, label, p, t5 in zip(batch.keys, y.tolist(), pred.tolist(), top5.tolist()):
            records[key] = {"label": label, "pred": p, "top5": bool(t5)}
    return records


def summarize_accuracy(records: Mapping[str, dict]) -> dict[str, float | int]:
    """``{"top1", "top5", "count"}`` (fractions in [0, 1]) over the records."""
    n = len(records)
    top1 = sum(r["pred"] == r["label"] for r in records.values())
    top5 = sum(r["top5"] for r in records.values())
    return {"top1": top1 / n if n else float("nan"), "top5": top5 / n if n else float("nan"), "count": n}
