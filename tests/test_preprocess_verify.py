"""``rankshard-preprocess verify`` on trees it did not expect: every odd file is a finding in the report
(exit status 1), never a traceback."""
import json
import shutil

import pytest
from click.testing import CliRunner

from rankshard.preprocess.cli import main
from rankshard.preprocess.format.tar import sha256_file, write_shard
from rankshard.preprocess.format.tarindex import read_shard
from loaders_shards import built_root


def _tree(tmp_path):
    root = tmp_path / "root"
    shutil.copytree(built_root() / "cifar10" / "test", root / "cifar10" / "test")
    return root


def _verify(root):
    result = CliRunner().invoke(main, ["verify", str(root), "--samples", "2", "--quiet"])
    assert "Traceback" not in result.output and not isinstance(result.exception, (KeyError, TypeError, ValueError))
    return result


def test_a_foreign_or_incomplete_manifest_is_a_finding_not_a_crash(tmp_path):
    root = _tree(tmp_path)
    assert _verify(root).exit_code == 0
    (root / "notes").mkdir()
    (root / "notes" / "manifest.json").write_text(json.dumps({"name": "another tool's manifest"}))
    (root / "cifar10" / "test" / "odd").mkdir()
    (root / "cifar10" / "test" / "odd" / "manifest.json").write_text(json.dumps({"format": "rankshard/1"}))
    result = _verify(root)
    assert result.exit_code == 1
    assert f"{root / 'notes' / 'manifest.json'}: not a rankshard manifest" in result.output
    assert f"{root / 'cifar10' / 'test' / 'odd' / 'manifest.json'}: incomplete manifest (no shards" in result.output
    assert result.output.count("\nok ") + result.output.startswith("ok ") == 2  # the real variants still checked



@pytest.mark.parametrize("field, value", [("num_samples", "29"), ("name", None), ("sha256", 0)])
def test_a_shard_entry_of_another_type_is_a_finding_not_a_crash(tmp_path, field, value):
    """A hand-edited (or damaged) manifest: was a TypeError, or an IsADirectoryError reading the folder itself."""
    root = _tree(tmp_path)
    path = root / "cifar10" / "test" / "full" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["shards"][0][field] = value
    path.write_text(json.dumps(manifest))
    result = _verify(root)
    assert result.exit_code == 1 and isinstance(result.exception, (SystemExit, type(None)))
    assert f"{path}: incomplete manifest (shard entry 0 has no usable {field})" in result.output

def test_a_sample_with_a_non_numeric_key_or_no_index_is_a_finding(tmp_path):
    """A shard whose manifest hash was rewritten over it (so the sha256 matches): its odd samples are named."""
    root = _tree(tmp_path)
    folder = root / "cifar10" / "test" / "full"
    manifest = json.loads((folder / "manifest.json").read_text())
    shard = manifest["shards"][0]
    _, members = read_shard(folder / shard["name"])[0]  # a whole, decodable sample ...
    odd = [("not-a-number", members), ("99999999", {**members, "json": json.dumps({"label": 1}).encode()})]
    write_shard(folder / shard["name"], odd)  # ... under a key that is no number, and one without an index
    shard["sha256"], shard["bytes"] = sha256_file(folder / shard["name"]), (folder / shard["name"]).stat().st_size
    (folder / "manifest.json").write_text(json.dumps(manifest))
    result = _verify(root)
    assert result.exit_code == 1 and "sample not-a-number does not decode" in result.output
    assert "sample 99999999 does not decode (KeyError: 'index')" in result.output


def test_a_label_that_disagrees_with_its_json_or_the_classes_is_a_finding(tmp_path):
    """A shard rewritten with its manifest hash (so the sha256 matches): the loaders' label rule applies."""
    root = _tree(tmp_path)
    folder = root / "cifar10" / "test" / "full"
    manifest = json.loads((folder / "manifest.json").read_text())
    shard = manifest["shards"][0]
    samples = read_shard(folder / shard["name"])
    (k0, m0), (k1, m1) = samples[:2]
    label0 = json.loads(m0["json"])["label"]
    flipped = {**m0, "cls": str((label0 + 1) % 10).encode()}  # .cls no longer the json's label
    record1 = {**json.loads(m1["json"]), "label": 99}
    beyond = {**m1, "cls": b"99", "json": json.dumps(record1).encode()}  # both agree, on no class
    write_shard(folder / shard["name"], [(k0, flipped), (k1, beyond), *samples[2:]])
    shard["sha256"], shard["bytes"] = sha256_file(folder / shard["name"]), (folder / shard["name"]).stat().st_size
    (folder / "manifest.json").write_text(json.dumps(manifest))
    result = _verify(root)
    assert result.exit_code == 1
    assert f"sample {k0} does not decode (LabelMismatch: label mismatch" in result.output
    assert f"sample {k1} does not decode (ValueError: label 99 is not a class of the manifest (0..9))" in result.output
