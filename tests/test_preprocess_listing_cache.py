"""The listing cache follows the tree: a file added or removed in a nested folder (ImageFolder trees may nest,
and symlinked folders are followed) rebuilds the listing; an unchanged tree reuses it."""
import os
import shutil

from rankshard.preprocess.imagejob import folder_source
from rankshard.preprocess.sources.folders import list_folder
from rankshard.preprocess.sources.images import Geometry
from rankshard.preprocess.sources.synthtree import write_train_tree

GEOMETRY = Geometry(24, 24)


def test_a_change_in_a_nested_or_linked_folder_rebuilds_the_cached_listing(tmp_path):
    root = tmp_path / "tree"
    write_train_tree(root, classes=2, per_class=2, odd=False)
    first_class, second_class = sorted(p for p in root.iterdir())
    (first_class / "deeper" / "deepest").mkdir(parents=True)
    shutil.copy(next(first_class.glob("*.JPEG")), first_class / "deeper" / "deepest" / "a.JPEG")
    os.symlink(first_class / "deeper", second_class / "linked")  # the same images, reached through a link
    cache = tmp_path / "cache"

    def check(expect_cached: bool):
        src = folder_source(root, GEOMETRY, cache)
        assert src.info["listing_cached"] == expect_cached
        assert src.listing.ids == list_folder(root).ids  # an uncached listing is the reference
        return src

    built = check(False)
    check(True)
    for folder in (first_class / "deeper" / "deepest", first_class / "deeper"):
        shutil.copy(next(first_class.glob("*.JPEG")), folder / "added.JPEG")
        check(False)
        check(True)
    (first_class / "deeper" / "deepest" / "a.JPEG").unlink()
    assert len(check(False)) == len(built) + 2 * 2 - 2
