"""Our shards are ordinary WebDataset shards: other readers see the same samples the loaders do."""
import io

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from rankshard.loaders import LoaderConfig, eval_loader, open_variant
from loaders_shards import built_root

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _loader_samples(info):
    out = {}
    for b in eval_loader(info, LoaderConfig(batch_size=64, workers=0)):
        out.update({k: (x.numpy(), int(y)) for k, x, y in zip(b.keys, b.x, b.y)})
    return out


@pytest.mark.parametrize("split,variant,decoder", [("train", "rank-005", "rgb8"), ("test", "rank-003", None)])
def test_plain_webdataset_reads_our_shards(split, variant, decoder):
    info = open_variant(built_root(), "cifar10", split, variant)
    ours = _loader_samples(info)
    ds = wds.WebDataset(info.urls, shardshuffle=False, empty_check=False)
    ds = ds.decode(decoder) if decoder else ds.decode()
    seen = 0
    for sample in ds:
        x, y = ours[sample["__key__"]]
        image = sample["png"] if "png" in sample else sample["npy"]
        scale = 255.0 if image.dtype == np.uint8 else 1.0
        assert np.allclose(image.transpose(2, 0, 1) / scale, x, atol=1e-6)
        assert sample["cls"] == y and sample["json"]["rank"] == info.rank
        seen += 1
    assert seen == info.num_samples


def test_hugging_face_datasets_reads_our_shards():
    datasets = pytest.importorskip("datasets")
    info = open_variant(built_root(), "cifar10", "train", "rank-005")
    ds = datasets.load_dataset("webdataset", data_files={"train": info.urls}, split="train")
    assert len(ds) == info.num_samples
    ours = _loader_samples(info)
    row = ds[0]
    x, y = ours[row["__key__"]]
    png = row["png"]  # a PIL image when datasets decodes it, bytes otherwise
    image = np.asarray((png if hasattr(png, "convert") else Image.open(io.BytesIO(png))).convert("RGB"))
    assert np.allclose(image.transpose(2, 0, 1) / 255.0, x, atol=1e-6) and int(row["cls"]) == y
