"""Streaming WebDataset loaders for rankshard shards: training, exactly-once evaluation, joins by key."""
from rankshard.loaders.config import LoaderConfig
from rankshard.loaders.errors import LoaderError, LoaderWarning, ShardReadError
from rankshard.loaders.join import JoinedBatch, join_variants
from rankshard.loaders.normalization import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, normalization_for
from rankshard.loaders.pipeline import Batch, Loader, eval_loader, train_loader
from rankshard.loaders.variant import VariantInfo, open_variant
from rankshard.preprocess.rank.factors import Factors, reconstruct

__all__ = [
    "Batch", "CIFAR10_MEAN", "CIFAR10_STD", "Factors", "IMAGENET_MEAN", "IMAGENET_STD", "JoinedBatch", "Loader",
    "LoaderConfig", "LoaderError", "LoaderWarning", "ShardReadError", "VariantInfo", "eval_loader",
    "join_variants", "normalization_for", "open_variant", "reconstruct", "train_loader",
]
