"""``--config FILE`` on the materialization and evaluation commands: the file's values are the defaults, a
flag on the command line wins, and a wrong key or a broken file is a clear error (exit 2, nothing written)."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from rankshard.evaluate.cli import main as evaluate_main
from rankshard.preprocess.cli import main
from rankshard.preprocess.sources.synth import class_images


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Two classes of four natural-looking 24x20 images (PNG)."""
    root = tmp_path_factory.mktemp("tree")
    for c in range(2):
        (root / f"class{c}").mkdir()
        for i, image in enumerate(class_images(c, 4, size=(24, 20), seed=c)):
            Image.fromarray(np.ascontiguousarray(image)).save(root / f"class{c}" / f"{i}.png")
    return root


def _folder(tree, out, *extra):
    return CliRunner().invoke(main, ["folder", "--source", str(tree), "--out", str(out), "--quiet", "--workers", "0",
                                     "--resize", "20", "--crop", "16", *extra])


def _tars(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.tar"))}


def test_a_config_file_gives_the_same_shards_as_the_flags(tree, tmp_path):
    config = tmp_path / "job.toml"
    config.write_text('ranks = [2, 5]\nshard-size = 3\nspectra = false\nhigh = "1"\n')
    by_file = _folder(tree, tmp_path / "file", "--config", str(config))
    by_flags = _folder(tree, tmp_path / "flags", "--ranks", "2,5", "--shard-size", "3", "--no-spectra", "--high", "1")
    assert by_file.exit_code == 0, by_file.output
    assert by_flags.exit_code == 0, by_flags.output
    tars = _tars(tmp_path / "file")
    assert tars == _tars(tmp_path / "flags")
    assert any("rank-005" in t for t in tars) and any("high-001" in t for t in tars)
    assert not any("spectra" in t for t in tars) and sum("full" in t for t in tars) == 3  # 8 samples / 3 a shard


def test_a_flag_on_the_command_line_wins(tree, tmp_path):
    config = tmp_path / "job.json"  # .json is read as JSON
    config.write_text('{"ranks": 2, "shard_size": 3}')  # a single number for a comma-list option works too
    result = _folder(tree, tmp_path / "out", "--config", str(config), "--shard-size", "8")
    assert result.exit_code == 0, result.output
    tars = _tars(tmp_path / "out")
    assert sorted(t.split("/")[-2] for t in tars if "full" not in t) == ["rank-002", "spectra"]
    assert sum("full" in t for t in tars) == 1  # --shard-size 8 beat the file's 3


@pytest.mark.parametrize("text, needle", [
    ("shard-sise = 3\n", "no option shard-sise in this command"),
    ("ranks = [2\n", "not a readable UTF-8 TOML"),
    ("spectra = 0\n", "is not something --spectra takes"),            # a number for a flag
    ("shard-size = 3.7\n", "a float for a whole number"),             # never truncated to 3
    ("workers = false\n", "true/false for an option that takes a value"),  # never 0 (all in-process)
    ("shard-size = {a = 1}\n", "is not something a command line can say"),
    ("seed = 1979-05-27\n", "is not something a command line can say"),
    ("shard-size = \"abc\"\n", "shard-size = 'abc'"),                # the option's own check, file and key named
    ("resize = [1, 2]\n", "a list for an option that takes one value"),
    ("shard-size = 3\nshard_size = 4\n", "given twice"),
    ("ranks = 2\nranks = 3\n", "not a readable UTF-8 TOML"),          # TOML itself refuses a repeated key
    ('source = "a\\u0000b"\n', "a NUL character"),                     # was os.stat's ValueError, a traceback
])
def test_a_wrong_key_or_a_broken_file_is_refused(tree, tmp_path, text, needle):
    config = tmp_path / "job.toml"
    config.write_text(text)
    result = _folder(tree, tmp_path / "out", "--config", str(config))
    assert result.exit_code == 2 and needle in result.output and "Traceback" not in result.output, result.output
    assert "--config" in result.output and str(config) in result.output.replace("\n", "")
    assert not (tmp_path / "out").exists()


def test_json_null_and_empty_lists_are_refused_not_guessed(tmp_path):
    config = tmp_path / "job.JSON"  # the suffix in any case means JSON
    config.write_text('{"out": null}')
    result = CliRunner().invoke(main, ["cifar10", "--source", str(tmp_path), "--config", str(config)])
    assert result.exit_code == 2 and "None is not something a command line can say" in result.output, result.output
    config.write_text('\ufeff{"split": []}')  # a byte-order mark is fine; an empty list is not
    result = CliRunner().invoke(main, ["cifar10", "--source", str(tmp_path), "--out", str(tmp_path / "o"),
                                       "--config", str(config)])
    assert result.exit_code == 2 and "an empty list" in result.output, result.output


def test_evaluate_commands_take_a_config_too(tmp_path):
    config = tmp_path / "eval.toml"
    config.write_text("limt = 10\n")  # checked before anything is loaded: no checkpoint needed to see it
    result = CliRunner().invoke(evaluate_main, ["accuracy", str(tmp_path / "missing.pt"), "--config", str(config)])
    assert result.exit_code == 2 and "no option limt in this command" in result.output, result.output
    assert "limit" in result.output
