"""Bad command-line values get a clear error (exit 2, no traceback); odd folder trees are listed once."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from rankshard.preprocess.cli import main
from rankshard.preprocess.sources.folders import list_folder
from rankshard.preprocess.sources.synth import class_images


@pytest.fixture
def tree(tmp_path):
    """Two classes of three small natural-looking images each (PNG), one of them a GIF."""
    root = tmp_path / "tree"
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i, image in enumerate(class_images(c, 3, size=(24, 20), seed=c)):
            ext = "gif" if (c, i) == (1, 2) else "png"
            Image.fromarray(np.ascontiguousarray(image)).save(root / f"class{c}" / f"{i}.{ext}")
    return root


@pytest.mark.parametrize("extra, needle", [
    (["--backend", "nonsense"], "'nonsense' is not one of 'auto', 'none'"),
    (["--crop", "0"], "--crop"),
    (["--resize", "0"], "--resize"),
    (["--max-pixels", "0"], "--max-pixels"),
    (["--shard-size", "0"], "--shard-size"),
    (["--ranks", "0,5"], "--ranks 0: ranks start at 1"),
    (["--ranks", "5,5"], "rank 5 is listed twice"),
])
def test_bad_values_are_refused_with_the_option_named(tree, tmp_path, extra, needle):
    result = CliRunner().invoke(main, ["folder", "--source", str(tree), "--out", str(tmp_path / "o"), "--quiet",
                                       "--workers", "0", *extra])
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output
    assert not list(tmp_path.rglob("*.tar"))


def test_ranks_beyond_the_stored_image_are_refused(tree, tmp_path):
    result = CliRunner().invoke(main, ["folder", "--source", str(tree), "--out", str(tmp_path / "o"), "--quiet",
                                       "--workers", "0", "--crop", "16", "--resize", "16", "--ranks", "5,16"])
    assert result.exit_code == 2 and "--ranks 16: on these 16x16 images 16 would store a copy of full" in result.output


def test_a_symlink_loop_lists_every_image_once_and_gifs_are_images(tree):
    (tree / "class0" / "loop").symlink_to(tree / "class0", target_is_directory=True)
    (tree / "class1" / "elsewhere").symlink_to(tree / "class0", target_is_directory=True)  # a real second path
    ids = list_folder(tree).ids
    # class0's images once (the loop back into itself is cut); class1 its own three plus class0's through
    # its link, which is a distinct folder of class1's tree
    assert len(ids) == 3 + 3 + 3 and len(set(ids)) == len(ids), ids
    assert sum(i.startswith("class0/") for i in ids) == 3
    assert "class1/2.gif" in ids


def test_a_gif_is_materialized_like_any_image(tree, tmp_path):
    import json
    result = CliRunner().invoke(main, ["folder", "--source", str(tree), "--out", str(tmp_path / "o"), "--quiet",
                                       "--workers", "0", "--crop", "16", "--resize", "16", "--ranks", "3"])
    assert result.exit_code == 0, result.output
    (manifest,) = (tmp_path / "o").rglob("rank-003/manifest.json")
    data = json.loads(manifest.read_text())
    assert data["num_samples"] == 6 and data["errors"] == []


def test_another_geometry_in_the_same_folder_is_refused_not_resumed(tree, tmp_path):
    args = ["folder", "--source", str(tree), "--out", str(tmp_path / "o"), "--quiet", "--workers", "0", "--ranks", "3"]
    first = CliRunner().invoke(main, [*args, "--crop", "16", "--resize", "16"])
    assert first.exit_code == 0, first.output
    other = CliRunner().invoke(main, [*args, "--crop", "20", "--resize", "20"])
    assert other.exit_code == 2 and "different configuration" in other.output and "geometry" in other.output
