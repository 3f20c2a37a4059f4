"""``rankshard-preprocess verify`` over HTTP takes a split folder too (``format/tree.py``); the remote ``ls``
and ``preview`` tests join it here.

Servers run on 127.0.0.1 (``ranged_http`` and ``s3_root`` in conftest.py serve ``built_root()``).
"""
from __future__ import annotations

from loaders_shards import built_root

TRAIN = ("cifar10", "train")


def test_verify_over_http_takes_a_split_folder(ranged_http):
    from rankshard.preprocess.verify import verify_tree

    url, _ = ranged_http
    remote = verify_tree(f"{url}/cifar10/train", reference_samples=2)
    local = verify_tree(built_root().joinpath(*TRAIN), reference_samples=2)
    assert remote.ok and [(c.folder.rsplit("/", 1)[1], c.samples, c.max_error) for c in remote.checks] == \
        [(c.folder.rsplit("/", 1)[1], c.samples, c.max_error) for c in local.checks]
