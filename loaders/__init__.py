"""Streaming WebDataset loaders for rankshard shards: training, exactly-once evaluation, joins by key."""
from .config import LoaderConfig
from .errors import LoaderError, LoaderWarning, ShardReadError
from .join import JoinedBatch, join_variants
from .normalization import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, normalization_for
from .pipeline import Batch, Loader, eval_loader, train_loader
from .variant import VariantInfo, open_variant

__all__ = [
    "Batch", "CIFAR10_MEAN", "CIFAR10_STD", "IMAGENET_MEAN", "IMAGENET_STD", "JoinedBatch", "Loader",
    "LoaderConfig", "LoaderError", "LoaderWarning", "ShardReadError", "VariantInfo", "eval_loader",
    "join_variants", "normalization_for", "open_variant", "train_loader",
]
