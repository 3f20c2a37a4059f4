"""Targeted / untargeted PGD evaluation (SPEC metrics; the paper's Table 2), per sample and reproducible.

The attack is ``rankshard.train.attacks.pgd``. What evaluation adds: per-sample seeding (each sample's target and
random start come from generators seeded by (seed, key), so a sample's result does not depend on its batch,
the batch size, or the number of DDP ranks), per-sample records, and the metrics:

* attack success rate -- adversarial prediction == target (untargeted: != label);
* recovery rate       -- adversarial prediction == label (SPEC);
* clean top-1         -- clean prediction == label, on the same evaluated samples;
* robust accuracy     -- clean AND adversarial prediction == label (a sample counts as robust only if the
  whole eps-ball, x included, is classified correctly; differs from recovery only on clean-wrong samples);

success and recovery also over the samples classified correctly on the clean input (``*_clean_correct``).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rankshard.preprocess.rank.engine import RankEngine
from rankshard.train.attacks import PGDConfig, pgd, random_targets

from rankshard.evaluate.accuracy import predict
from rankshard.evaluate.perturbation_rank import rank_profile, record_fields
from rankshard.evaluate.spectrum import SpectrumConfig, spectrum_batch


@dataclass(frozen=True)
class PGDEvalConfig:
    """An attack and the seed from which every sample's target and random start are derived."""

    attack: PGDConfig
    seed: int = 0


def sample_seed(seed: int, key: str, purpose: str) -> int:
    """A 63-bit seed for one sample and purpose ("target", "start"); stable across runs and platforms."""
    digest = hashlib.sha256(f"rankshard:{purpose}:{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample_generators(seed: int, keys: Sequence[str], purpose: str, device: str | torch.device) -> list[torch.Generator]:
    """One seeded ``torch.Generator`` per sample key, on ``device``."""
    return [torch.Generator(device=device).manual_seed(sample_seed(seed, k, purpose)) for k in keys]


def keyed_targets(y: torch.Tensor, keys: Sequence[str], num_classes: int, seed: int) -> torch.Tensor:
    """Targets uniform over the other classes (``random_targets``), drawn per sample from its keyed generator."""
    gens = sample_generators(seed, keys, "target", "cpu")
    return torch.cat([random_targets(y[i:i + 1].cpu(), num_classes, g) for i, g in enumerate(gens)]).to(y.device)


def perturbation_size(adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample size of ``adv - x`` in the attack's norm (L-inf: max abs; L2: Euclidean), float64."""
    delta = (adv.double() - x.double()).flatten(1)
    return delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)


@dataclass(frozen=True)
class Extras:
    """What a PGD evaluation measures beyond the attack's outcome (nothing by default); the attack is the same."""

    delta_rank: bool = False                # ``perturbation_rank.rank_profile`` of each perturbation
    spectrum: SpectrumConfig | None = None  # Algorithm 1 on the clean AND the adversarial input, same ranks
    engine: RankEngine | None = None        # the SVD for ``spectrum``


def attack_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, keys: Sequence[str], num_classes: int,
                 cfg: PGDEvalConfig, extras: Extras = Extras()) -> dict[str, dict]:
    """Records ``{key: {"label", "target", "clean", "adv", "delta"}}`` for one batch (target -1 if untargeted),
    plus what ``extras`` asks for: the perturbation's rank profile (``perturbation_rank.record_fields``) and the
    predictions on the rank-k truncations of the clean and adversarial inputs (``clean_at_rank``, ``adv_at_rank``,
    one per ``extras.spectrum.ranks``)."""
    target = keyed_targets(y, keys, num_classes, cfg.seed) if cfg.attack.targeted else None
    starts = sample_generators(cfg.seed, keys, "start", x.device)
    clean = predict(model, x).argmax(1)
    adv = pgd(model, x, y, cfg.attack, target, starts)
    adv_pred = predict(model, adv).argmax(1)
    delta = perturbation_size(adv, x, cfg.attack.norm)
    targets = target.tolist() if target is not None else [-1] * len(keys)
    records = {k: {"label": lab, "target": t, "clean": c, "adv": a, "delta": d}
               for k, lab, t, c, a, d in zip(keys, y.tolist(), targets, clean.tolist(), adv_pred.tolist(), delta.tolist())}
    if extras.delta_rank:
        profile = rank_profile(x, adv)
        for i, k in enumerate(keys):
            records[k].update(record_fields(profile, i))
    if extras.spectrum is not None:
        for name, inputs in (("clean_at_rank", x), ("adv_at_rank", adv)):
            _, preds = spectrum_batch(model, inputs, extras.engine, extras.spectrum)
            for k, p in zip(keys, preds.tolist()):
                records[k][name] = p
    return records


def pgd_records(model: nn.Module, batches: Iterable, num_classes: int, cfg: PGDEvalConfig, device: str,
                extras: Extras = Extras()) -> dict[str, dict]:
    """Per-sample PGD records for every sample of ``batches`` (x, y, keys); model parameters stay frozen."""
    records: dict[str, dict] = {}
    for batch in batches:
        x, y = batch.x.to(device, torch.float32), batch.y.to(device)
        records.update(attack_batch(model, x, y, batch.keys, num_classes, cfg, extras))
    return records


def summarize_rank_path(records: Mapping[str, dict], ranks: Sequence[int], targeted: bool) -> list[dict]:
    """Per rank k: top-1 on the clean x_k, recovery (label) and attack success on the adversarial x'_k, as
    fractions of ``count`` samples; the attack was made on the full-rank input (not adaptive to truncation)."""
    rows = list(records.values())
    n = max(len(rows), 1)
    out = []
    for i, k in enumerate(ranks):
        clean = sum(r["clean_at_rank"][i] == r["label"] for r in rows)
        recovered = sum(r["adv_at_rank"][i] == r["label"] for r in rows)
        success = sum((r["adv_at_rank"][i] == r["target"]) if targeted else (r["adv_at_rank"][i] != r["label"])
                      for r in rows)
        out.append({"rank": k, "clean_top1": clean / n, "adv_recovery": recovered / n, "adv_success": success / n,
                    "count": len(rows)})
    return out


def _rate(hits: Sequence[bool]) -> float:
    return sum(hits) / len(hits) if hits else float("nan")


def summarize_pgd(records: Mapping[str, dict], targeted: bool) -> dict[str, float | int]:
    """SPEC's metrics (fractions in [0, 1]) over all samples and over those correct on the clean input."""
    rows = list(records.values())
    success = [(r["adv"] == r["target"]) if targeted else (r["adv"] != r["label"]) for r in rows]
    recovered = [r["adv"] == r["label"] for r in rows]
    clean_ok = [r["clean"] == r["label"] for r in rows]
    subset = [i for i, ok in enumerate(clean_ok) if ok]
    return {
        "count": len(rows), "clean_correct": len(subset),
        "attack_success": _rate(success), "recovery": _rate(recovered),
        "clean_top1": _rate(clean_ok), "robust_accuracy": _rate([a and b for a, b in zip(clean_ok, recovered)]),
        "attack_success_clean_correct": _rate([success[i] for i in subset]),
        "recovery_clean_correct": _rate([recovered[i] for i in subset]),
        "max_delta": max((r["delta"] for r in rows), default=0.0),
    }
