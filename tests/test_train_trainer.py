"""The trainer on tiny in-memory data: learning, resume equivalence, NaN stop, run folder rules, PGD-AT."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from rankshard.train import rundir, trainer as trainer_module
from rankshard.train.checkpoint import load_checkpoint, model_from_checkpoint
from rankshard.train.config import ConfigError, from_preset
from rankshard.train.data import Batch, TensorData
from rankshard.train.run import run
from rankshard.train.trainer import Trainer, TrainingDiverged, parameter_groups


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    return TensorData.synthetic(per_class=20, size=16, test_per_class=8)


def tiny(**overrides):
    base = {"arch": "resnet18", "width": "8", "epochs": "2", "batch_size": "40", "lr": "0.2",
            "warmup_epochs": "0.5", "log_every": "2", "eval_batch_size": "100", "device": "cpu"}
    return from_preset("cifar10-fast", {**base, **overrides})


def quiet(_msg):
    pass


def test_tiny_run_learns_and_writes_run_folder(tmp_path, data):
    cfg = tiny(epochs="4")
    records = run(cfg, tmp_path, data=data, log=quiet)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["eval"]["full"]["top1"] > 0.5  # chance is 0.1
    assert records[-1]["eval"]["full"]["n"] == 80
    lines = rundir.read_metrics(tmp_path)
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4] and lines[-1]["step"] == 4 * 5
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "config.json").read_text())["config"]["lr"] == 0.2
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["metrics"]["best_top1"] == max(r["eval"]["full"]["top1"] for r in records)
    model, payload = model_from_checkpoint(tmp_path / "last.pt")
    assert payload["epoch"] == 4 and payload["data"]["classes"][0] == "class0"
    x, y = data.test["full"]
    with torch.no_grad():
        top1 = (model(x).argmax(1) == y).float().mean().item()
    assert top1 == pytest.approx(records[-1]["eval"]["full"]["top1"])


def _weights(path):
    return load_checkpoint(path)["state_dict"]


def _strip_time(records):
    return [{k: v for k, v in r.items() if k not in ("time", "train")} | {"train": {k: v for k, v in r["train"].items()
            if k not in ("seconds", "images_per_s")}} for r in records]


@pytest.mark.parametrize("interrupt", ["epoch", "mid-epoch"])
def test_resume_reproduces_uninterrupted_weights(tmp_path, data, interrupt):
    cfg = tiny()
    run(cfg, tmp_path / "straight", data=data, log=quiet)
    broken = tmp_path / "broken"
    rundir.prepare(broken, cfg)
    first = Trainer(cfg, broken, data, log=quiet)
    if interrupt == "epoch":
        first.fit(stop_after_epochs=1)
    else:
        first.fit(stop_after_steps=first.steps_per_epoch + 2)  # inside epoch 2: the loader must skip 2 batches
    del first
    run(cfg, broken, resume=True, data=data, log=quiet)
    a, b = _weights(tmp_path / "straight" / "last.pt"), _weights(broken / "last.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _strip_time(rundir.read_metrics(tmp_path / "straight")) == _strip_time(rundir.read_metrics(broken))



@pytest.mark.parametrize("form", ["name", "path"])
def test_resume_from_an_earlier_state_when_last_pt_is_missing(tmp_path, data, form):
    """A lost last.pt (deleted, a copy without it) must not block --resume-from; the refusal lists what is there."""
    cfg = tiny(epochs="3")
    run(cfg, tmp_path / "straight", data=data, log=quiet)
    broken = tmp_path / "broken"
    run(cfg, broken, data=data, log=quiet, stop_after_epochs=2)
    (broken / "last.pt").unlink()
    with pytest.raises(ConfigError, match=f"--resume {broken} --resume-from last.prev.pt"):
        run(cfg, broken, resume=True, data=data, log=quiet)
    with pytest.raises(ConfigError, match="no epoch-0001.pt"):
        run(cfg, broken, resume=True, resume_from="epoch-0001.pt", data=data, log=quiet)
    source = "last.prev.pt" if form == "name" else str(broken / "last.prev.pt")
    run(cfg, broken, resume=True, resume_from=source, data=data, log=quiet)
    a, b = _weights(tmp_path / "straight" / "last.pt"), _weights(broken / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["epoch"] for r in rundir.read_metrics(broken)] == [1, 2, 3]


def test_resume_survives_a_torn_metrics_line_and_names_a_damaged_run_file(tmp_path, data):
    """A crash (power loss, full disk) during the epoch-record append leaves a torn last line; that epoch's
    last.pt was never written, so the line is dropped on resume. Damage elsewhere is a ConfigError naming
    the file, not a JSONDecodeError traceback."""
    cfg = tiny(epochs="3")
    run(cfg, tmp_path / "straight", data=data, log=quiet)
    broken = tmp_path / "broken"
    run(cfg, broken, data=data, log=quiet, stop_after_epochs=2)
    with open(broken / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "eval": {"fu')
    run(cfg, broken, resume=True, data=data, log=quiet)
    assert _strip_time(rundir.read_metrics(tmp_path / "straight")) == _strip_time(rundir.read_metrics(broken))
    lines = (broken / "metrics.jsonl").read_text().splitlines()
    (broken / "metrics.jsonl").write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    with pytest.raises(ConfigError, match=r"metrics.jsonl line 2 is not JSON"):
        rundir.read_metrics(broken)
    (broken / "config.json").write_text('{"config": ')
    with pytest.raises(ConfigError, match=r"config.json is not valid JSON"):
        rundir.read_config(broken)


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


@pytest.mark.parametrize("crash_after", ["best.pt", "last.pt"])
def test_best_pt_survives_a_kill_at_any_point_of_the_epoch_save(tmp_path, data, monkeypatch, crash_after):
    """best.pt must end as the straight run's wherever a kill lands in save(). Before the fix last.pt (which
    records best_top1) was written first: a kill right after it made the resumed run believe best.pt was
    current, so the new best was never written."""
    cfg = tiny(epochs="3")
    run(cfg, tmp_path / "straight", data=data, log=quiet)
    tops = [r["eval"]["full"]["top1"] for r in rundir.read_metrics(tmp_path / "straight")]
    last_best = max(e for e in range(1, 4) if tops[e - 1] >= max(tops[:e]))  # the epoch best.pt holds
    real_save = trainer_module.save_checkpoint

    def dying_save(path, payload):
        out = real_save(path, payload)
        if path.name == crash_after and payload["epoch"] == last_best and payload["metrics"].get("last"):
            raise Killed
        return out

    monkeypatch.setattr(trainer_module, "save_checkpoint", dying_save)
    broken = tmp_path / "broken"
    with pytest.raises(Killed):
        run(cfg, broken, data=data, log=quiet)
    monkeypatch.undo()
    if load_checkpoint(broken / "last.pt")["epoch"] < cfg.epochs:
        run(cfg, broken, resume=True, data=data, log=quiet)
    a, b = (load_checkpoint(d / "best.pt") for d in (tmp_path / "straight", broken))
    assert a["epoch"] == b["epoch"] == last_best
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])

class NaNAfterFirstEpoch(TensorData):
    def train_batches(self, epoch, batch_size, rank, world_size, start_step=0):
        batches = super().train_batches(epoch, batch_size, rank, world_size, start_step)
        if epoch == 0:
            return batches
        poisoned = [Batch(b.x * float("nan"), b.y, b.keys) for b in batches]
        return poisoned


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data):
    poisoned = NaNAfterFirstEpoch(data.train, data.test, data.classes)
    with pytest.raises(TrainingDiverged, match="last good state"):
        run(tiny(), tmp_path, data=poisoned, log=quiet)
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    assert len(rundir.read_metrics(tmp_path)) == 1


def test_run_folder_refuses_other_config_unless_overwrite(tmp_path, data):
    run(tiny(epochs="1"), tmp_path, data=data, log=quiet)
    with pytest.raises(ConfigError, match=r"lr: 0\.2 \(saved\) -> 0\.3"):
        run(tiny(epochs="1", lr="0.3"), tmp_path, data=data, log=quiet)
    with pytest.raises(ConfigError, match="--resume"):
        run(tiny(epochs="1"), tmp_path, data=data, log=quiet)  # same config, not asked to resume
    run(tiny(epochs="1", lr="0.3"), tmp_path, data=data, overwrite=True, log=quiet)
    assert load_checkpoint(tmp_path / "last.pt")["config"]["lr"] == 0.3
    assert len(rundir.read_metrics(tmp_path)) == 1


def test_runtime_fields_may_change_on_resume(tmp_path, data):
    cfg = tiny()
    rundir.prepare(tmp_path, cfg)
    Trainer(cfg, tmp_path, data, log=quiet).fit(stop_after_epochs=1)
    records = run(tiny(log_every="100", eval_batch_size="7"), tmp_path, resume=True, data=data, log=quiet)
    assert [r["epoch"] for r in records] == [2]


def test_extra_variants_are_evaluated(tmp_path, data):
    extra = TensorData(data.train, {**data.test, "dark": (data.test["full"][0] * 0.3, data.test["full"][1])},
                       data.classes)
    records = run(tiny(epochs="1", extra_variants="dark"), tmp_path, data=extra, log=quiet)
    assert set(records[0]["eval"]) == {"full", "dark"} and records[0]["eval"]["dark"]["n"] == 80


def test_no_weight_decay_on_norm_and_bias():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2))
    decay, no_decay = parameter_groups(model, 5e-4, decay_norm_and_bias=False)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3, 3, 3]), torch.Size([2, 4])]
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0  # conv bias, BN w/b, fc bias
    (everything,) = parameter_groups(model, 5e-4, decay_norm_and_bias=True)
    assert len(everything["params"]) == 6


def test_accumulation_step_matches_literal_chunk_loop(data):
    cfg = tiny(accum_steps="2", label_smoothing="0.1", lr="0.05", schedule="cosine", warmup_epochs="0")
    t = Trainer(cfg, "unused", data, log=quiet)
    reference = copy.deepcopy(t.model).train()
    batch = next(iter(data.train_batches(0, 40, 0, 1)))
    t.train_step(batch)
    # Literal reference: per-chunk mean losses weighted by chunk share, one SGD step by hand (momentum buffer
    # starts as the gradient, Nesterov uses g + m * buf, decay only on >1-d parameters).
    for xc, yc in zip(batch.x.chunk(2), batch.y.chunk(2)):
        loss = F.cross_entropy(reference(xc), yc, label_smoothing=0.1) * (len(yc) / len(batch.y))
        loss.backward()
    lr = t.schedule.lr(0)
    with torch.no_grad():
        for (name, p), q in zip(reference.named_parameters(), t.model.parameters()):
            g = p.grad + (5e-4 * p if p.ndim > 1 else 0)
            expected = p - lr * (g + 0.9 * g)
            torch.testing.assert_close(q, expected, rtol=1e-5, atol=1e-6, msg=name)


def test_adversarial_training_attacks_in_eval_mode(tmp_path, data, monkeypatch):
    modes = []
    real_pgd = trainer_module.pgd

    def spy(model, x, y, cfg, **kwargs):
        modes.append(model.training)
        adv = real_pgd(model, x, y, cfg, **kwargs)
        assert (adv - x).abs().max() <= cfg.eps + 1e-6
        return adv

    monkeypatch.setattr(trainer_module, "pgd", spy)
    cfg = tiny(epochs="1", adv_norm="linf", adv_eps="8/255", adv_steps="2")
    t = Trainer(cfg, tmp_path, data, log=quiet)
    t.fit()
    assert modes and not any(modes)                 # every attack ran in eval mode (MadryLab convention)
    assert t.model.training                          # and training mode came back for the update
    assert t.adv.eps == pytest.approx(8 / 255) and t.adv.alpha == pytest.approx(2.5 * (8 / 255) / 2)
    assert math.isfinite(rundir.read_metrics(tmp_path)[0]["train"]["loss"])


def test_widths_that_crash_torch_cpu_backward_are_refused_with_the_reproduction(tmp_path, data):
    with pytest.raises(ConfigError, match=r"--width 4 on CPU.*oneDNN.*benchmarks/repro_narrow_conv.py"):
        run(tiny(width="4"), tmp_path, data=data, log=quiet)
    assert not (tmp_path / "last.pt").exists()


@pytest.mark.slow
def test_narrow_conv_reproduction_runs_isolated():
    """The crash candidate runs in its own processes: a segfault or hang there cannot take pytest down."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks/repro_narrow_conv.py"
    out = subprocess.run([sys.executable, str(script), "--tries", "2", "--steps", "50", "--watchdog", "120"],
                         capture_output=True, text=True, timeout=400)
    assert out.stdout.count("try ") == 2, out.stdout + out.stderr  # each try reported: ok, hung or crashed
