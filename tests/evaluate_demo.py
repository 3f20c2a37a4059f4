"""Demo-sized inputs for the evaluate tests: CIFAR-shaped synthetic shards and tiny untrained checkpoints."""
from pathlib import Path

import torch

from rankshard.preprocess.pipeline import ArraySource, materialize_split
from rankshard.preprocess.sources.synth import labelled_images
from rankshard.preprocess.spec import ShardSpec
from rankshard.train.checkpoint import checkpoint_payload, save_checkpoint
from rankshard.train.models import build_model


def demo_shards(out: Path, per_class: int, ranks=(3,), shard_size: int = 20, seed: int = 3) -> Path:
    """``out/cifar10/test/{full,rank-00k}`` from ``10 * per_class`` 32x32 synthetic images in source order."""
    images, labels = labelled_images(per_class, size=(32, 32), seed=seed)
    info = {"kind": "test", "path": "memory", "fingerprint": f"synth-{seed}", "checksum_verified": False}
    source = ArraySource(images, labels, [f"mem:{i}" for i in range(len(labels))], tuple("abcdefghij"), info)
    materialize_split(source, ShardSpec(dataset="cifar10", split="test", ranks=tuple(ranks), high=(), factors=None,
                                        shuffle=False, shard_size=shard_size, workers=0, backend="torch"),
                      out, show_progress=False)
    return out


def tiny_checkpoint(path: Path, seed: int, variant: str = "cifar", num_classes: int = 10, **data) -> str:
    """A width-4 ResNet-18 checkpoint (untrained: plumbing, not accuracy); ``data`` goes to the payload."""
    torch.manual_seed(seed)
    model = build_model("resnet18", variant, num_classes, width=4)
    return str(save_checkpoint(path, checkpoint_payload(model, data=data or {"variant": "full"})))


def tiny_attack_setup(n: int = 16, size: int = 16, flipped: int = 3):
    """A fixed random width-4 ResNet-18 (eval), ``n`` random ``size``-pixel images and labels = its predictions
    with the first ``flipped`` changed (clean-wrong samples): attack plumbing and guarantees, not accuracy."""
    torch.manual_seed(0)
    model = build_model("resnet18", "cifar", 10, 4).eval()
    x = torch.rand(n, 3, size, size)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:flipped] = (y[:flipped] + 1) % 10
    return model, x, y
