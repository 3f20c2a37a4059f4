"""Statistics in the report: seed groups, pairs, bands, and the rank-vs-low-pass section, end to end on demo shards."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rankshard.evaluate import comparisons as cmp
from rankshard.evaluate.checkpoints import load_checkpoints
from rankshard.evaluate.data import shard_data
from rankshard.evaluate.distributed import DistContext
from rankshard.evaluate.report import build_report
from rankshard.evaluate.runs import run_accuracy, run_pgd, run_spectrum
from rankshard.evaluate.robustness import PGDEvalConfig
from rankshard.evaluate.spectrum import SpectrumConfig, rank_inputs
from rankshard.evaluate.stats import mean_ci, paired_bootstrap
from rankshard.preprocess.rank.engine import RankEngine
from rankshard.preprocess.rank.lowpass import lowpass
from rankshard.train.attacks import PGDConfig

from evaluate_demo import demo_shards, tiny_checkpoint


def test_seed_group_and_pairs():
    assert cmp.seed_group("rank-008-seed1") == ("rank-008", 1)
    assert cmp.seed_group("full@seed12") == ("full", 12)
    assert cmp.seed_group("natural") == ("natural", None)
    names = ["full-seed0", "full-seed1", "rank-004-seed0", "rank-004-seed1", "rank-004-seed2"]
    # seed by seed against the baseline group; seed 2 has no baseline partner
    assert cmp.pairs(names) == [("full-seed0", "rank-004-seed0"), ("full-seed1", "rank-004-seed1")]
    assert cmp.pairs(["a", "b", "c"]) == [("a", "b"), ("a", "c")]
    assert cmp.pairs(["only"]) == [] and cmp.has_seed_groups(names) and not cmp.has_seed_groups(["a", "b"])


def test_bands_are_mean_ci_per_k():
    series = {"g-seed0": {0: 0.1, 5: 0.5}, "g-seed1": {0: 0.1, 5: 0.7}, "g-seed2": {0: 0.1, 5: 0.6, 9: 1.0}}
    (band,) = cmp.bands(series)
    ci = mean_ci([0.5, 0.7, 0.6])
    assert band.x == (0, 5) and band.seeds == 3  # only ks every seed has
    assert band.mean[1] == pytest.approx(0.6) and (band.low[1], band.high[1]) == pytest.approx((ci.low, ci.high))
    assert band.low[0] == pytest.approx(0.1) == band.high[0]  # no spread, no band


def test_paired_table_flags_noise():
    a = {str(i): i % 5 != 0 for i in range(100)}
    same = dict(a)
    table = cmp.paired_table("full", {"x": a, "y": same}, "top-1")
    assert table.rows[0]["note"] == "within noise" and table.rows[0]["only A / only B"] == "0 / 0"
    assert cmp.noise_notes(table) == ["Within noise on full (Holm p >= 0.05 and the bootstrap CI covers 0): y vs x."]
    worse = {k: False for k in a}
    assert cmp.paired_table("full", {"x": a, "y": worse}, "top-1").rows[0]["note"].startswith("significant")
    # 1 vs 7 discordant of 300: McNemar p = 0.07 but the bootstrap CI excludes 0 -> said to be borderline
    x = np.zeros(300, bool)
    y = x.copy()
    x[0], y[1:8] = True, True
    note = cmp.paired_table("t", {"x": dict(enumerate(x)), "y": dict(enumerate(y))}, "attack success").rows[0]["note"]
    assert note.startswith("borderline")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cmp")
    shards = demo_shards(root / "shards", per_class=4, ranks=(3,))
    paths = [f"{g}-seed{s}={tiny_checkpoint(root / f'{g}{s}.pt', seed=10 * i + s)}"
             for i, g in enumerate(("full", "rank-003")) for s in (0, 1)]
    ckpts = load_checkpoints(paths, "cpu")
    ctx = DistContext(0, 1, "cpu")
    data = shard_data(shards, "cifar10", "test", "full", batch_size=20, workers=0)
    out = root / "results"
    run_accuracy(ckpts, [data], ctx, out / "accuracy", quiet=True)
    for mode in ("low", "lowpass"):
        run_spectrum(ckpts, data, SpectrumConfig((0, 2, 5, 32), mode), RankEngine("torch", "cpu"), ctx,
                     out / f"spectrum-{mode}", quiet=True)
    attack = PGDConfig(norm="linf", eps=4 / 255, steps=2, targeted=True)
    run_pgd(ckpts, data, PGDEvalConfig(attack), ctx, out / "pgd", quiet=True)
    return out, data


def test_lowpass_spectrum_inputs_and_rank_check(evaluated):
    out, data = evaluated
    result = json.loads((out / "spectrum-lowpass" / "spectrum-lowpass-full-seed0.json").read_text())
    assert result["mode"] == "lowpass" and [r["rank"] for r in result["rows"]] == [0, 2, 5, 32]
    assert all(row["bound_holds"] for row in result["rank_check"]["rows"])
    assert [r["k"] for r in result["rank_check"]["rows"]] == [2, 5, 32]  # k = 0 is the zero image
    assert result["rank_check"]["rows"][0]["max_rank"] == [2, 2, 2]
    x = next(iter(data.batches(0, 1))).x[:4]
    for group, inputs in rank_inputs(x, None, SpectrumConfig((0, 3, 32), "lowpass", 8)):
        for i, k in enumerate(group):
            torch.testing.assert_close(inputs[i * 4:(i + 1) * 4], lowpass(x, k), atol=0, rtol=0)
    full = next(r for r in result["rows"] if r["rank"] == 32)
    assert full["agreement"] == 1.0  # k = n keeps every frequency: the image itself


def test_report_shows_error_bands_paired_tables_and_rank_vs_lowpass(evaluated, tmp_path):
    out, _ = evaluated
    report = build_report([out], tmp_path / "report")
    md = report.markdown.read_text()
    assert "top-1 mean ± 95% CI (%)" in md and "attack success mean ± 95% CI (%)" in md
    assert md.count("paired tests on the same points") == 2  # accuracy and PGD
    assert "McNemar p" in md and "B - A (95% CI, points)" in md
    assert "bands.png" in md and "rank-vs-lowpass" in md
    assert "Rank truncation vs frequency truncation" in md and "| yes |" in md.replace("|yes|", "| yes |")
    assert not report.skipped
    figures = sorted(p.name for p in (tmp_path / "report" / "figures").iterdir())
    assert any("rank-vs-lowpass" in f for f in figures) and sum("bands" in f for f in figures) == 2


def test_seed_table_mean_ci_and_effect_size():
    from rankshard.evaluate.stats import cohens_d

    values = {"full-seed0": 0.869, "full-seed1": 0.933, "rank-004-seed0": 0.90, "rank-004-seed1": 0.91}
    rows = cmp.seed_table(values, "top-1", "test").rows
    ci = mean_ci([0.869, 0.933])
    assert rows[0]["top-1 mean ± 95% CI (%)"] == f"{100 * ci.mean:.1f} ± {100 * ci.half_width:.1f} (n=2)"
    assert rows[0]["Cohen's d vs first group"] == "+0.00"
    assert rows[1]["Cohen's d vs first group"] == f"{cohens_d([0.869, 0.933], [0.90, 0.91]):+.2f}"
    assert cmp.seed_table({"a": 0.5, "b": 0.6}, "top-1", "test") is None  # no seed groups, no table


def test_paired_table_corrects_for_several_pairs():
    # three checkpoints each get 12 points the baseline misses and miss 3 it gets (of 300): McNemar p = 0.035
    # apiece, below 0.05 alone; but three tests at once: Holm p = 0.106, so none may be called significant
    from rankshard.evaluate.stats import binom_two_sided_half, holm

    base = np.zeros(300, bool)
    base[200:203] = True
    outcomes = {"base": dict(enumerate(base))}
    for i in range(3):
        y = np.zeros(300, bool)
        y[20 * i:20 * i + 12] = True
        outcomes[f"m{i}"] = dict(enumerate(y))
    table = cmp.paired_table("t", outcomes, "top-1")
    assert [r["only A / only B"] for r in table.rows] == ["3 / 12"] * 3
    raw = binom_two_sided_half(3, 15)
    assert raw < 0.05 and [float(r["McNemar p"]) for r in table.rows] == pytest.approx([raw] * 3, rel=1e-2)
    assert [float(r["Holm p"]) for r in table.rows] == pytest.approx(holm([raw] * 3), rel=1e-2)
    assert holm([raw] * 3)[0] >= 0.05
    assert not any(r["note"].startswith("significant") for r in table.rows)
    assert "Holm-adjusted over the 3 pair(s)" in table.caption


def test_intervals_of_a_table_of_m_pairs_are_simultaneous_bonferroni():
    """Three pairs: each interval is the paired bootstrap at 1 - 0.05/3 (the table's caption says so), wider than
    the single-pair 95% interval of the same data, which is what a single pair still gets."""
    rng = np.random.default_rng(3)
    outcomes = {name: dict(enumerate(rng.random(400) < p)) for name, p in
                (("a", 0.6), ("b", 0.65), ("c", 0.55), ("d", 0.6))}
    table = cmp.paired_table("t", outcomes, "top-1")
    assert "simultaneous 95% percentile intervals (Bonferroni: each at 98.33%, 3 pairs)" in table.caption
    column = "B - A (95% CI, points)"
    for row in table.rows:
        a, b = (list(outcomes[row[x]].values()) for x in ("A", "B"))
        wide = paired_bootstrap(a, b, cmp.BOOTSTRAP_RESAMPLES, 0, level=1 - 0.05 / 3)
        plain = paired_bootstrap(a, b, cmp.BOOTSTRAP_RESAMPLES, 0)
        assert row[column].split(" [")[1] == f"{100 * wide.low:+.1f}, {100 * wide.high:+.1f}]"
        assert wide.low < plain.low and wide.high > plain.high
    single = cmp.paired_table("t", {n: outcomes[n] for n in ("a", "b")}, "top-1")
    plain = paired_bootstrap(list(outcomes["a"].values()), list(outcomes["b"].values()), cmp.BOOTSTRAP_RESAMPLES, 0)
    assert single.rows[0][column].split(" [")[1] == f"{100 * plain.low:+.1f}, {100 * plain.high:+.1f}]"
    assert "95% percentile interval;" in single.caption
