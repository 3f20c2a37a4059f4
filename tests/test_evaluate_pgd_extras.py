"""What ``pgd`` measures beyond the attack: ``--delta-rank`` (the perturbation's rank structure, against a literal
float64 numpy loop of each definition) and ``--spectrum-ranks`` (Algorithm 1 on clean and adversarial inputs,
against the float64 reference truncation)."""
import csv
import json
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from evaluate_demo import demo_shards, tiny_checkpoint
from photos import photo_batch
from rankshard.evaluate.cli import main
from rankshard.evaluate.perturbation_rank import isotropic_in_image, rank_profile, summarize
from rankshard.evaluate.robustness import (Extras, PGDEvalConfig, attack_batch, keyed_targets, sample_generators,
                                           summarize_rank_path)
from rankshard.evaluate.spectrum import SpectrumConfig
from rankshard.preprocess.rank.engine import RankEngine, reference_low_rank
from rankshard.train.attacks import PGDConfig, pgd
from rankshard.train.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference(x: np.ndarray, adv: np.ndarray) -> dict[str, np.ndarray]:
    """The module docstring's definitions, one sample, one channel and one k at a time, in float64."""
    out = {"spectrum": [], "in_image": [], "effective_rank": [], "stable_rank": []}
    for xs, advs in zip(x.astype(np.float64), adv.astype(np.float64)):
        delta = advs - xs
        total = float((delta ** 2).sum())
        n = min(delta.shape[1:])
        spectrum, in_image, eff, stable = np.zeros(n), np.zeros(n), [], []
        for xc, dc in zip(xs, delta):
            s = np.linalg.svd(dc, compute_uv=False)
            u, _, vt = np.linalg.svd(xc)
            for k in range(1, n + 1):
                spectrum[k - 1] += (s[:k] ** 2).sum() / total
                in_image[k - 1] += (np.linalg.norm(u[:, :k].T @ dc @ vt[:k].T) ** 2) / total
            if s.sum() > 0:
                p = s / s.sum()
                p = p[p > 0]
                eff.append(np.exp(-(p * np.log(p)).sum()))
                stable.append((s ** 2).sum() / s[0] ** 2)
        out["spectrum"].append(spectrum)
        out["in_image"].append(in_image)
        out["effective_rank"].append(np.mean(eff))
        out["stable_rank"].append(np.mean(stable))
    return {k: np.array(v) for k, v in out.items()}


def photos(side_h: int, side_w: int) -> np.ndarray:
    """Real photographs (natural spectra), cropped to H x W."""
    return photo_batch(["astronaut", "chelsea", "coffee"], max(side_h, side_w))[:, :, :side_h, :side_w]


@pytest.mark.parametrize("shape", [(16, 16), (12, 20), (20, 12)])
def test_matches_a_literal_float64_loop_on_photos(shape):
    x = photos(*shape)
    rng = np.random.default_rng(0)
    # an L-inf-ball perturbation (mostly +-eps, like PGD's) and a smooth low-rank one, inside [0, 1]
    sign = np.sign(rng.standard_normal(x.shape)) * 4 / 255
    smooth = 0.02 * np.einsum("bci,bcj->bcij", rng.standard_normal(x.shape[:3]), rng.standard_normal(x.shape[:2] + x.shape[3:]))
    for delta in (sign, smooth, sign + smooth):
        adv = np.clip(x + delta, 0, 1).astype(np.float32)
        got = rank_profile(torch.from_numpy(x), torch.from_numpy(adv))
        want = reference(x, adv)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-10, atol=1e-12, err_msg=name)


def test_structured_perturbations_give_the_exact_values():
    x = photos(16, 16)[:1].astype(np.float64)
    u, _, vt = np.linalg.svd(x[0])                          # per channel: u [3, 16, 16], vt [3, 16, 16]
    k = 3
    rng = np.random.default_rng(1)
    core = rng.standard_normal((3, k, k))
    inside = 1e-3 * (u[:, :, :k] @ core @ vt[:, :k, :])    # lies in the image's top-3 subspaces exactly
    p = rank_profile(torch.from_numpy(x), torch.from_numpy(x + inside[None]))
    np.testing.assert_allclose(p["in_image"][0, k - 1:], 1, atol=1e-12)
    assert p["in_image"][0, k - 2] < 1 - 1e-3
    np.testing.assert_allclose(p["spectrum"][0, k - 1:], 1, atol=1e-12)   # rank 3 itself
    outside = 1e-3 * (u[:, :, k:] @ rng.standard_normal((3, 16 - k, 16 - k)) @ vt[:, k:, :])
    p = rank_profile(torch.from_numpy(x), torch.from_numpy(x + outside[None]))
    np.testing.assert_allclose(p["in_image"][0, :k], 0, atol=1e-12)
    rank1 = 1e-3 * np.einsum("ci,cj->cij", rng.standard_normal((3, 16)), rng.standard_normal((3, 16)))
    p = rank_profile(torch.from_numpy(x), torch.from_numpy(x + rank1[None]))
    np.testing.assert_allclose([p["effective_rank"][0], p["stable_rank"][0], p["spectrum"][0, 0]], 1, atol=1e-9)


def test_a_zero_perturbation_is_nan_without_warnings_and_left_out_of_the_means():
    x = torch.from_numpy(photos(8, 8))
    adv = x.clone()
    adv[0] += 0.01  # only the first sample is changed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = rank_profile(x, adv)
    assert np.isfinite(p["spectrum"][0]).all() and np.isnan(p["spectrum"][1:]).all()
    assert np.isnan(p["effective_rank"][1:]).all() and np.isfinite(p["effective_rank"][0])
    records = {str(i): {f"delta_{n}": p[n][i] for n in p} for i in range(3)}
    s = summarize(records)
    assert s["samples"] == 1 and s["in_image"] == pytest.approx(list(p["in_image"][0]))


def test_isotropic_reference_is_the_mean_for_gaussian_perturbations():
    """k^2/(HW) is E[in_image] for an isotropic delta: over 4000 seeded Gaussian draws the mean lands within
    4 standard errors of it at every k."""
    h, w = 6, 5
    rng = np.random.default_rng(2)
    draws = rng.standard_normal((4000, 1, h, w))
    x = np.broadcast_to(photos(h, w)[:1, :1], draws.shape).copy()
    p = rank_profile(torch.from_numpy(x), torch.from_numpy(x + 1e-3 * draws))
    mean, se = p["in_image"].mean(0), p["in_image"].std(0) / np.sqrt(len(draws))
    assert np.all(np.abs(mean - isotropic_in_image(h, w)) <= 4 * se + 1e-12)


def test_cli_writes_curves_table_figure_and_report(tmp_path):
    root = tmp_path / "data"
    demo_shards(root / "shards", 2, shard_size=10)
    ck = tiny_checkpoint(root / "a.pt", 0)
    common = ["--data", root / "shards", "--device", "cpu", "--workers", "0", "--batch-size", "4", "--limit", "6",
              "--eps", "8/255", "--steps", "2"]
    run = lambda *a: CliRunner().invoke(main, [str(v) for v in a])  # noqa: E731
    plain = run("pgd", f"a={ck}", *common, "--out", tmp_path / "plain")
    result = run("pgd", f"a={ck}", *common, "--out", tmp_path / "pgd", "--delta-rank", "--spectrum-ranks", "0:32:4",
                 "--svd-backend", "torch")
    assert plain.exit_code == 0 and result.exit_code == 0, result.output
    body = json.loads((tmp_path / "pgd" / "pgd.json").read_text())
    curves = np.load(tmp_path / "pgd" / "pgd-a-delta-rank.npz")
    samples = list(csv.DictReader(open(tmp_path / "pgd" / "pgd-a-samples.csv")))
    assert list(curves["keys"]) == [r["key"] for r in samples] and curves["in_image"].shape == (6, 32)
    summary = body["delta_rank"]["checkpoints"]["a"]
    np.testing.assert_allclose(summary["in_image"], curves["in_image"].mean(0), atol=1e-8)
    np.testing.assert_allclose(summary["effective_rank"], np.mean([float(r["delta_effective_rank"]) for r in samples]))
    assert np.all(np.diff(curves["spectrum"]) >= -1e-12) and np.allclose(curves["in_image"][:, -1], 1)
    assert body["figures"] == ["pgd-delta-rank.png", "pgd-spectrum.png"] and body["config"]["delta_rank"] is True
    assert body["config"]["spectrum"]["ranks"] == list(range(0, 33, 4))
    path = list(csv.DictReader(open(tmp_path / "pgd" / "pgd-a-spectrum-samples.csv")))
    assert [r["key"] for r in path] == [r["key"] for r in samples]
    # k = 32 is the image itself: the truncated predictions are the plain clean and adversarial ones
    assert [(r["clean_rank_32"], r["adv_rank_32"]) for r in path] == [(r["clean"], r["adv"]) for r in samples]
    full = body["spectrum"]["checkpoints"]["a"][-1]
    row = body["rows"][0]
    assert (full["rank"], full["clean_top1"], full["adv_recovery"], full["adv_success"]) == (
        32, row["clean_top1"], row["recovery"], row["attack_success"])
    # the attack and its metrics are the same with or without the measurement
    plain_rows = json.loads((tmp_path / "plain" / "pgd.json").read_text())["rows"]
    assert [{k: r[k] for k in plain_rows[0]} for r in body["rows"]] == plain_rows
    # a second checkpoint evaluated apart (as a study does, one result per checkpoint) joins the same table and figures
    other = tiny_checkpoint(root / "b.pt", 1)
    assert run("pgd", f"b={other}", *common, "--out", tmp_path / "pgd-b", "--delta-rank", "--spectrum-ranks", "0:32:4",
               "--svd-backend", "torch").exit_code == 0
    report = run("report", tmp_path / "pgd", tmp_path / "pgd-b", "--out", tmp_path / "report")
    assert report.exit_code == 0, report.output
    md = (tmp_path / "report" / "report.md").read_text()
    section = md[md.index("## PGD perturbations and rank"):]
    assert section.count("| a | 6 |") == 1 and section.count("| b | 6 |") == 1  # one delta table, both in it
    assert "b adv recovery" in section and section.count("![") == 2
    assert "isotropic delta" in md and "in top-4" in md and "pgd-delta-rank-" in md
    assert "a adv recovery" in md and "pgd-spectrum-" in md and "not an adaptive evaluation" in md
    assert all(f"| {k} |" in md for k in range(0, 33, 4))  # every rank up to 12 of them, both ends included


def test_truncated_predictions_match_the_float64_reference_truncation():
    """adv_at_rank / clean_at_rank: the model's prediction on the float64 reference rank-k truncation of the same
    adversarial (recomputed here from the same keyed seeds) and clean inputs; near-ties (top-2 logit margin
    below 1e-3, where float32 reconstruction may flip the argmax) are not compared."""
    torch.manual_seed(0)
    model = build_model("resnet18", "cifar", 10, 4).eval()
    x = torch.from_numpy(photos(16, 16)).repeat(2, 1, 1, 1)[:5]
    y = torch.tensor([0, 1, 2, 3, 4])
    keys = [f"k{i}" for i in range(5)]
    cfg = PGDEvalConfig(PGDConfig("linf", 8 / 255, 3, targeted=True), seed=7)
    ranks = (0, 1, 2, 5, 9, 16)
    records = attack_batch(model, x, y, keys, 10, cfg, Extras(spectrum=SpectrumConfig(ranks),
                                                               engine=RankEngine("torch", "cpu")))
    adv = pgd(model, x, y, cfg.attack, keyed_targets(y, keys, 10, cfg.seed), sample_generators(cfg.seed, keys, "start", "cpu"))
    compared = 0
    for side, inputs in (("clean_at_rank", x), ("adv_at_rank", adv)):
        for i, k in enumerate(ranks):
            xk = torch.from_numpy(reference_low_rank(inputs.double().numpy(), k)).float()
            with torch.no_grad():
                logits = model(xk)
            top2 = logits.topk(2, dim=1).values
            for j, key in enumerate(keys):
                if top2[j, 0] - top2[j, 1] >= 1e-3:
                    assert records[key][side][i] == int(logits[j].argmax()), (side, k, key)
                    compared += 1
    assert compared >= 50  # of 60: the check is not vacuous


def test_rank_path_summary_is_the_literal_count():
    records = {"a": {"label": 1, "target": 2, "clean_at_rank": [0, 1], "adv_at_rank": [2, 1]},
               "b": {"label": 3, "target": 4, "clean_at_rank": [3, 3], "adv_at_rank": [4, 4]},
               "c": {"label": 5, "target": 6, "clean_at_rank": [0, 5], "adv_at_rank": [0, 5]}}
    targeted = summarize_rank_path(records, [1, 7], targeted=True)
    assert targeted == [{"rank": 1, "clean_top1": 1 / 3, "adv_recovery": 0.0, "adv_success": 2 / 3, "count": 3},
                        {"rank": 7, "clean_top1": 1.0, "adv_recovery": 2 / 3, "adv_success": 1 / 3, "count": 3}]
    untargeted = summarize_rank_path(records, [1, 7], targeted=False)
    assert [r["adv_success"] for r in untargeted] == [1.0, 1 / 3]
