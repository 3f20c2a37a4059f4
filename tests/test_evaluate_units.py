"""evaluate: rank parsing, key merging, metric summaries against literal loops, names, tables."""
import pytest
import torch
from torch import nn

from rankshard.evaluate.checkpoints import split_names
from rankshard.evaluate.data import tensor_data
from rankshard.evaluate.distributed import check_complete, merge_by_key
from rankshard.evaluate.errors import EvaluationError
from rankshard.evaluate.robustness import sample_generators, sample_seed, summarize_pgd
from rankshard.evaluate.spectrum import SpectrumConfig, parse_ranks, summarize_spectrum
from rankshard.evaluate.tables import markdown_table, pct
from rankshard.preprocess.sources.synth import natural_batch
from rankshard.train.attacks import PGDConfig, pgd


def test_parse_ranks():
    assert parse_ranks("all", 4) == (0, 1, 2, 3, 4)
    assert parse_ranks("0:32", 32) == tuple(range(33))
    assert parse_ranks("0:224:8", 224) == tuple(range(0, 225, 8))
    assert parse_ranks("5, 1,1,10", 32) == (1, 5, 10)
    assert parse_ranks("0:8:4,32", 32) == (0, 4, 8, 32)
    with pytest.raises(EvaluationError, match=r"rank 33 is outside the image: .* rank 0\.\.32"):
        parse_ranks("0:33", 32)
    for bad in ("x", "1:2:0", "", "1-5"):
        with pytest.raises(EvaluationError, match="--ranks"):
            parse_ranks(bad, 32)
    with pytest.raises(EvaluationError, match="--mode"):
        SpectrumConfig((1,), "middle")


def test_merge_by_key_refuses_duplicates_and_sorts():
    merged = merge_by_key([{"00000002": {"a": 1}}, {"00000000": {"a": 0}, "00000001": {"a": 2}}])
    assert list(merged) == ["00000000", "00000001", "00000002"]
    with pytest.raises(EvaluationError, match="00000001 was evaluated by more than one rank"):
        merge_by_key([{"00000001": {}}, {"00000001": {}}])
    with pytest.raises(EvaluationError, match="evaluated 3 samples but the data holds 4"):
        check_complete(merged, 4, "x")


def test_tensor_data_is_exactly_once_for_any_world_size():
    x = torch.from_numpy(natural_batch(23)).float()
    y = torch.arange(23) % 10
    data = tensor_data(x, y, 10, batch_size=4, limit=21)
    for world in (1, 2, 3, 5):
        keys = [k for r in range(world) for b in data.batches(r, world) for k in b.keys]
        assert sorted(keys) == [f"{i:08d}" for i in range(21)]
        for r in range(world):  # what each rank's progress bar counts to is what it gets
            assert sum(len(b.keys) for b in data.batches(r, world)) == data.samples_of(r, world)


def test_summaries_match_literal_counts():
    recs = {"0": {"label": 1, "target": 2, "clean": 1, "adv": 2, "delta": 0.01},
            "1": {"label": 3, "target": 0, "clean": 3, "adv": 3, "delta": 0.02},
            "2": {"label": 4, "target": 5, "clean": 7, "adv": 4, "delta": 0.0},
            "3": {"label": 0, "target": 9, "clean": 2, "adv": 9, "delta": 0.01}}
    s = summarize_pgd(recs, targeted=True)
    assert (s["attack_success"], s["recovery"], s["clean_top1"], s["robust_accuracy"]) == (0.5, 0.5, 0.5, 0.25)
    assert (s["attack_success_clean_correct"], s["recovery_clean_correct"], s["clean_correct"]) == (0.5, 0.5, 2)
    u = summarize_pgd(recs, targeted=False)
    assert u["attack_success"] == 0.5 and u["max_delta"] == 0.02
    spec = {"a": {"label": 1, "full": 1, "preds": [0, 1, 1]}, "b": {"label": 2, "full": 3, "preds": [0, 3, 2]}}
    rows = summarize_spectrum(spec, (0, 5, 32))
    assert [(r["top1"], r["agreement"]) for r in rows] == [(0.0, 0.0), (0.5, 1.0), (1.0, 0.5)]


def test_split_names():
    assert split_names(["nat=a/b.pt", "c/rank10.pt"]) == [("nat", "a/b.pt"), ("rank10", "c/rank10.pt")]
    assert split_names(["r1/last.pt", "r2/last.pt"]) == [("r1-last", "r1/last.pt"), ("r2-last", "r2/last.pt")]
    with pytest.raises(EvaluationError, match="NAME=PATH"):
        split_names(["x=a.pt", "x=b.pt"])


def test_tables():
    assert pct(0.95214) == "95.21%" and pct(float("nan")) == "n/a"
    assert markdown_table([{"a": 1, "b": "x"}]) == "| a | b |\n|---|---|\n| 1 | x |"


def test_sample_seeds_are_stable_and_distinct():
    assert sample_seed(0, "00000001", "start") == sample_seed(0, "00000001", "start")
    assert len({sample_seed(s, k, p) for s in (0, 1) for k in ("0", "1") for p in ("start", "target")}) == 8


def test_per_sample_generators_make_pgd_batch_independent():
    """The same sample gets the same adversarial example alone or inside a batch (rankshard.train.attacks extension)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                        nn.Linear(16, 10)).double().eval()
    x = torch.from_numpy(natural_batch(6, size=(12, 12)))
    y = torch.arange(6)
    keys = [f"{i:08d}" for i in range(6)]
    cfg = PGDConfig("linf", 8 / 255, 3)
    whole = pgd(net, x, y, cfg, generator=sample_generators(0, keys, "start", "cpu"))
    part = pgd(net, x[3:5], y[3:5], cfg, generator=sample_generators(0, keys[3:5], "start", "cpu"))
    assert torch.equal(whole[3:5], part)
    with pytest.raises(ValueError, match="2 per-sample generators for a batch of 6"):
        pgd(net, x, y, cfg, generator=sample_generators(0, keys[:2], "start", "cpu"))


def test_trained_on_reads_what_the_trainer_records():
    from rankshard.evaluate.checkpoints import _trained_on

    assert _trained_on({"data": {"train_variant": "rank-005", "dataset": "cifar10"}}) == "rank-005"
    assert _trained_on({"data": {"variant": "rank-010"}}) == "rank-010"
    assert _trained_on({}) == "?"
