"""svd-profile: projections and selection vs literal numpy, incidence/Jaccard by hand, CLI smoke test."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from evaluate_demo import demo_shards, tiny_checkpoint
from rankshard.evaluate.cli import main
from rankshard.evaluate.data import tensor_data
from rankshard.evaluate.weights.svd_profile import (ProfileConfig, ProfileError, class_counts, class_incidence, collect_magnitudes,
                                  influential, jaccard, layer_bases, profile_model)
from rankshard.preprocess.sources.synth import natural_batch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(5, 4))


def _literal_conv_magnitudes(w: np.ndarray, x: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """Input side, by loops: norm over positions of s_i v_i . patch, with numpy's own SVD."""
    _, vt_s = _numpy_rows(w)
    _, c, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out_h = (xp.shape[2] - kh) // stride + 1
    out_w = (xp.shape[3] - kw) // stride + 1
    mags = np.zeros((x.shape[0], vt_s.shape[0]))
    for b in range(x.shape[0]):
        for i in range(out_h):
            for j in range(out_w):
                patch = xp[b, :, i * stride:i * stride + kh, j * stride:j * stride + kw].reshape(-1)
                mags[b] += (vt_s @ patch) ** 2
    return np.sqrt(mags)


def _numpy_rows(w: np.ndarray):
    _, s, vt = np.linalg.svd(w.reshape(w.shape[0], -1).astype(np.float64), full_matrices=False)
    return s, s[:, None] * vt


def _literal_influential(row: np.ndarray, mass: float) -> set[int]:
    order = sorted(range(len(row)), key=lambda i: (-row[i], i))
    kept, total = set(), 0.0
    for i in order:
        if total >= mass * row.sum() or row.sum() == 0:
            break
        kept.add(i)
        total += row[i]
    return kept


def test_projection_and_selection_match_literal_numpy():
    model = _tiny_model().double()
    imgs = torch.from_numpy(natural_batch(6, size=(8, 8), seed=1))  # float64 [6, 3, 8, 8]
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    data = tensor_data(imgs, y, 4, batch_size=4)
    cfg = ProfileConfig(layers="0,4", mass=0.6, per_class=2)
    bases = {k: type(v)(v.u.double(), v.s.double(), None if v.bias is None else v.bias.double())
             for k, v in layer_bases(model, cfg.layers, None).items()}
    mags, labels = collect_magnitudes(model, data.batches(0, 1), bases, 4, 2)
    assert labels.tolist() == y.tolist()
    conv = model[0]
    ref = _literal_conv_magnitudes(conv.weight.detach().numpy(), imgs.numpy(), 2, 1)
    np.testing.assert_allclose(mags["0"].numpy(), ref, rtol=1e-6, atol=1e-9)
    with torch.no_grad():
        feats = model[3](model[2](model[1](conv(imgs)))).numpy()
    _, rows = _numpy_rows(model[4].weight.detach().numpy())
    np.testing.assert_allclose(mags["4"].numpy(), np.abs(feats @ rows.T), rtol=1e-6, atol=1e-9)
    for name in ("0", "4"):
        flags = influential(mags[name], cfg.mass).numpy()
        for b, row in enumerate(mags[name].numpy()):
            assert set(np.flatnonzero(flags[b])) == _literal_influential(row, cfg.mass)


def test_influential_hand_cases():
    mags = torch.tensor([[3.0, 1.0, 1.0, 0.5], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert influential(mags, 0.5).int().tolist() == [[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]]
    assert influential(mags, 0.6).int().tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]]
    assert influential(torch.tensor([[3.0, 1.0, 1.0, 0.0]]), 1.0).int().tolist() == [[1, 1, 1, 0]]


def test_counts_incidence_jaccard_by_hand():
    flags = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    counts, images = class_counts(flags, torch.tensor([0, 0, 1, 1, 2]), 4)
    assert counts.tolist() == [[2, 1, 0, 0], [0, 1, 2, 0], [1, 0, 0, 1], [0, 0, 0, 0]]
    assert images.tolist() == [2, 2, 1, 0]
    union = class_incidence(counts, images, 0.0)
    assert union.astype(int).tolist() == [[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 1], [0, 0, 0, 0]]
    assert class_incidence(counts, images, 0.6).astype(int).tolist() == [[1, 0, 0, 0], [0, 0, 1, 0],
                                                                         [1, 0, 0, 1], [0, 0, 0, 0]]
    # {0,1} vs {1,2}: 1/3; {0,1} vs {0,3}: 1/3; {1,2} vs {0,3}: 0; anything vs empty: 0; empty vs empty: 1.
    expect = np.array([[1, 1 / 3, 1 / 3, 0], [1 / 3, 1, 0, 0], [1 / 3, 0, 1, 0], [0, 0, 0, 1]])
    np.testing.assert_allclose(jaccard(union), expect)


def test_profile_model_combines_layers():
    model = _tiny_model()
    x = torch.from_numpy(natural_batch(8, size=(16, 16), seed=0)).float()
    y = torch.arange(8) % 4
    prof = profile_model(model, tensor_data(x, y, 4).batches(0, 1), 4, ProfileConfig(layers="*", top_k=3, per_class=1))
    assert prof.images.tolist() == [1, 1, 1, 1] and prof.incidence.shape == (4, 3 + 3)
    assert prof.nodes[:2] == ["0:0", "0:1"] and prof.nodes[-1] == "4:2"
    np.testing.assert_allclose(np.diag(prof.jaccard), 1.0)
    with pytest.raises(ProfileError, match="--mass"):
        ProfileConfig(mass=0.0)
    with pytest.raises(ProfileError, match="matches none"):
        layer_bases(model, "nope*", None)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("svdp")
    demo_shards(root / "shards", 4, ranks=())
    return root, tiny_checkpoint(root / "a.pt", 0)


def test_cli_smoke(shards, tmp_path):
    root, ckpt = shards
    args = ["svd-profile", str(ckpt), "--data", str(root / "shards"), "--per-class", "3", "--layers", "layer4.*,fc",
            "--top-k", "6", "--workers", "0", "--batch-size", "16", "--out", str(tmp_path / "o")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    hyper = json.loads((tmp_path / "o" / "hypergraph.json").read_text())
    assert hyper["classes"] == list("abcdefghij") and len(hyper["incidence"]) == 10
    assert len(hyper["nodes"]) == len(hyper["incidence"][0]) and hyper["nodes"][-1] == "fc:5"
    body = json.loads((tmp_path / "o" / "svd-profile.json").read_text())
    assert body["images_per_class"] == [3] * 10 and body["config"]["mass"] == 0.5 and body["kind"] == "svd-profile"
    assert [r["layer"] for r in body["summary"]][-1] == "fc" and body["figures"] == ["jaccard.png"]
    jac = np.array(json.loads((tmp_path / "o" / "jaccard.json").read_text())["matrix"])
    assert jac.shape == (10, 10) and np.allclose(jac, jac.T) and (tmp_path / "o" / "jaccard.png").stat().st_size > 0
    bad = CliRunner().invoke(main, args[:-2] + ["--out", str(tmp_path / "b"), "--mass", "1.5"])
    assert bad.exit_code == 2 and "--mass 1.5" in bad.output and "Traceback" not in bad.output
    bad = CliRunner().invoke(main, args[:4] + ["--layers", "nope", "--out", str(tmp_path / "n")])
    assert bad.exit_code == 2 and "matches none" in bad.output, bad.output
    assert not (tmp_path / "n").exists()
    missing = CliRunner().invoke(main, args[:4])
    assert missing.exit_code == 2 and "--out" in missing.output
