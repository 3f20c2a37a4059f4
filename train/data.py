"""What the trainer needs from a dataset, and two implementations: shards (via ``loaders``) and tensors.

``TrainData`` is the small interface the trainer uses: class names, normalization, training batches of
epoch ``e`` for one rank (same number of steps on every rank, deterministic given seed and epoch, able to
start at a given step for mid-epoch resume) and exactly-once evaluation batches per variant.
``ShardData`` implements it on materialized shards through ``loaders``; ``TensorData`` holds images in
memory (tests, benchmarks, and any dataset small enough to keep on the device).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, NamedTuple, Protocol, Sequence

import torch

from rankshard.train.models import INPUT_SIZE


class Batch(NamedTuple):
    """Images [B, C, H, W] float in [0, 1], labels [B] int64, sample keys (for joining evaluation results)."""

    x: torch.Tensor
    y: torch.Tensor
    keys: Sequence[str] = ()


class TrainData(Protocol):
    """The dataset interface of ``rankshard.train.trainer.Trainer``."""

    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def train_batches(self, epoch: int, batch_size: int, rank: int, world_size: int,
                      start_step: int = 0) -> Iterable[Batch]:
        """Batches of ``batch_size`` (per rank) for ``epoch``; ``len()`` = steps per epoch, equal on all ranks."""

    def eval_batches(self, variant: str, batch_size: int, rank: int, world_size: int) -> Iterable[Batch]:
        """This rank's share of ``variant``'s test split; across ranks every sample exactly once."""

    def describe(self) -> dict[str, Any]:
        """What the model was trained on (checkpoint ``data`` field): dataset, variants, manifest hashes."""


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # One stream per (seed, epoch): an epoch's order never depends on how many epochs ran in this process.
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


class _Sized:
    """An iterable with a known length (the steps of an epoch), built from a generator function."""

    def __init__(self, length: int, make: Any):
        self._length, self._make = length, make

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[Batch]:
        return iter(self._make())


@dataclass
class TensorData:
    """An in-memory dataset: ``train`` = (x [N, C, H, W] in [0, 1], y [N]), ``test`` = {variant: (x, y)}.

    An epoch is ``N // (batch_size * world_size)`` global batches of a seeded permutation (the remainder
    is dropped, so every rank steps equally); rank r takes the r-th slice of each global batch. Training
    augmentation: a seeded horizontal flip per image (rank-preserving, like the loaders' augmentation).
    """

    train: tuple[torch.Tensor, torch.Tensor]
    test: dict[str, tuple[torch.Tensor, torch.Tensor]]
    classes: tuple[str, ...]
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.25, 0.25, 0.25)
    seed: int = 0
    flip: bool = True

    def steps_per_epoch(self, batch_size: int, world_size: int) -> int:
        steps = len(self.train[1]) // (batch_size * world_size)
        if steps < 1:
            raise ValueError(f"{len(self.train[1])} training images cannot fill one global batch of "
                             f"{batch_size} x {world_size} ranks; lower --batch-size")
        return steps

    def train_batches(self, epoch: int, batch_size: int, rank: int, world_size: int,
                      start_step: int = 0) -> _Sized:
        steps = self.steps_per_epoch(batch_size, world_size)

        def make() -> Iterator[Batch]:
            gen = _epoch_generator(self.seed, epoch)
            order = torch.randperm(len(self.train[1]), generator=gen)
            flips = torch.rand(len(order), generator=gen) < 0.5
            for step in range(start_step, steps):
                start = (step * world_size + rank) * batch_size
                idx = order[start:start + batch_size]
                x = self.train[0][idx]
                if self.flip:
                    x = torch.where(flips[idx].view(-1, 1, 1, 1), x.flip(-1), x)
                yield Batch(x, self.train[1][idx], [f"{int(i):08d}" for i in idx])

        return _Sized(steps - start_step, make)

    def eval_batches(self, variant: str, batch_size: int, rank: int, world_size: int) -> Iterator[Batch]:
        if variant not in self.test:
            raise KeyError(f"no test variant {variant!r}; have {sorted(self.test)}")
        x, y = self.test[variant]
        idx = torch.arange(rank, len(y), world_size)
        for start in range(0, len(idx), batch_size):
            part = idx[start:start + batch_size]
            yield Batch(x[part], y[part], [f"{int(i):08d}" for i in part])

    @classmethod
    def synthetic(cls, per_class: int, size: int = 16, test_per_class: int = 10, num_classes: int = 10,
                  seed: int = 0) -> "TensorData":
        """Learnable natural-spectrum images from ``rankshard.preprocess.sources.synth`` (train and test drawn with other seeds)."""
        from rankshard.preprocess.sources.synth import labelled_images

        def tensors(n: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
            images, labels = labelled_images(n, (size, size), s, num_classes)
            return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255), torch.from_numpy(labels)

        return cls(tensors(per_class, seed), {"full": tensors(test_per_class, seed + 1)},
                   tuple(f"class{c}" for c in range(num_classes)), seed=seed)

    def describe(self) -> dict[str, Any]:
        return {"dataset": "in-memory", "classes": list(self.classes), "num_train": int(len(self.train[1])),
                "test_variants": sorted(self.test)}


# Augmentation by dataset when ``augment="auto"``: CIFAR's pad-4 crop + flip, else ImageNet's RandomResizedCrop.
def _auto_augment(dataset: str) -> str:
    return "cifar" if dataset.lower().startswith("cifar") else "imagenet"


class ShardData:
    """``TrainData`` on materialized shards, through ``loaders`` (train split for training, test split's
    variants for evaluation). Classes and normalization come from the training variant's manifest."""

    def __init__(self, cfg: Any):
        from rankshard.loaders import open_variant

        self.cfg = cfg
        self._open = open_variant
        self.train_info = open_variant(cfg.data_root, cfg.dataset, "train", cfg.train_variant,
                                       verify_shards=cfg.verify_shards)
        self.classes = tuple(self.train_info.classes)
        self.mean, self.std = tuple(self.train_info.mean), tuple(self.train_info.std)
        self.augment = _auto_augment(cfg.dataset) if cfg.augment == "auto" else cfg.augment
        self._test: dict[str, Any] = {}

    def _test_info(self, variant: str) -> Any:
        if variant not in self._test:
            info = self._open(self.cfg.data_root, self.cfg.dataset, "test", variant,
                              verify_shards=self.cfg.verify_shards)
            if tuple(info.classes) != self.classes:
                raise ValueError(f"{info.folder}: classes differ from the training variant's "
                                 f"({len(info.classes)} vs {len(self.classes)}); were they materialized from the "
                                 "same dataset?")
            self._test[variant] = info
        return self._test[variant]

    def _crop(self) -> int | None:
        """ImageNet-style training crops (and eval center crops) at the stem's input size (224), capped by the
        stored size; CIFAR-style training keeps the stored size (pad-4 crop)."""
        if self.augment != "imagenet":
            return None
        return min(INPUT_SIZE[self.cfg.model_variant], *self.train_info.image_size)

    def _loader_config(self, batch_size: int, augment: str) -> Any:
        from rankshard.loaders import LoaderConfig

        return LoaderConfig(batch_size=batch_size, workers=self.cfg.workers, augment=augment, seed=self.cfg.seed,
                            crop_size=self._crop())

    def train_batches(self, epoch: int, batch_size: int, rank: int, world_size: int, start_step: int = 0):
        from rankshard.loaders import train_loader

        cfg = self._loader_config(batch_size, self.augment)
        return train_loader(self.train_info, cfg, epoch, rank=rank, world_size=world_size, start_step=start_step)

    def eval_batches(self, variant: str, batch_size: int, rank: int, world_size: int):
        from rankshard.loaders import eval_loader

        return eval_loader(self._test_info(variant), self._loader_config(batch_size, "none"), rank, world_size)

    def describe(self) -> dict[str, Any]:
        manifest = self.train_info.manifest
        return {"dataset": self.cfg.dataset, "train_variant": self.cfg.train_variant, "classes": list(self.classes),
                "train_manifest_hash": str(manifest.get("config_hash", "")), "num_train": int(self.train_info.num_samples),
                "test_variants": [self.cfg.test_variant, *self.cfg.extra_variants]}
