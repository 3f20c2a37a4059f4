from click.testing import CliRunner

from rankshard.preprocess.cli import main


def test_demo_runs_end_to_end_offline(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path), "--per-class", "10", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "all variants verified" in result.output and "Next steps" in result.output
    split = tmp_path / "shards" / "cifar10"
    for name in ("full", "rank-005", "rank-010", "rank-020", "high-002", "high-005", "factors-008", "spectra"):
        assert (split / "train" / name / "manifest.json").exists()
        assert (split / "test" / name / "manifest.json").exists()
    assert (split / "train" / "preview.png").stat().st_size > 10_000
    assert (split / "test" / "preview-energy.png").exists()
