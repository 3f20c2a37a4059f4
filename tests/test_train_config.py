"""TrainConfig presets, overrides, validation, and the lr schedules against independent references."""
import json

import pytest
import torch
from click.testing import CliRunner

from rankshard.train.cli import main
from rankshard.train.config import (PRESETS, ConfigError, TrainConfig, apply_overrides, config_hash, differences,
                          from_json, from_preset)
from rankshard.train.schedule import Schedule


def test_paper_presets_encode_the_papers():
    c = PRESETS["cifar10-paper"]
    assert (c.epochs, c.lr, c.momentum, c.weight_decay, c.milestones, c.gamma, c.batch_size) == \
        (350, 0.1, 0.9, 5e-4, (150.0, 250.0), 0.1, 128)
    assert (c.arch, c.model_variant, c.schedule) == ("resnet50", "cifar", "multistep")
    i = PRESETS["imagenet-paper"]
    assert (i.epochs, i.lr, i.lr_reference_batch, i.weight_decay, i.milestones, i.batch_size, i.model_variant) == \
        (90, 0.1, 256, 1e-4, (30.0, 60.0), 256, "imagenet")
    f = PRESETS["cifar10-fast"]
    assert f.schedule == "onecycle" and f.epochs <= 40 and f.label_smoothing > 0 and not f.wd_on_norm_and_bias


def test_overrides_parse_every_kind_of_field():
    cfg = from_preset("cifar10-fast", {"lr": "0.25", "epochs": "12", "nesterov": "false",
                                       "milestones": "3,6", "extra_variants": "rank-005,high-002", "adv_norm": "l2"})
    assert cfg.lr == 0.25 and cfg.epochs == 12 and cfg.nesterov is False
    assert cfg.milestones == (3.0, 6.0) and cfg.extra_variants == ("rank-005", "high-002")
    assert cfg.batch_size == PRESETS["cifar10-fast"].batch_size  # untouched fields keep the preset's values
    assert from_json(json.loads(json.dumps(cfg.to_json()))) == cfg


@pytest.mark.parametrize("overrides, needle", [
    ({"lr": "fast"}, "--lr"), ({"schedule": "step"}, "--schedule"), ({"epochs": "0"}, "--epochs"),
    ({"schedule": "onecycle", "warmup_epochs": "0"}, "warmup"), ({"milestones": "200,100"}, "increasing"),
    ({"adv_norm": "linf", "adv_eps": "8"}, "8/255"), ({"bogus": "1"}, "unknown config field"),
    ({"label_smoothing": "1.5"}, "label-smoothing"),
])
def test_invalid_values_name_the_option(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        from_preset("cifar10-paper", overrides)


def test_hash_ignores_runtime_fields_only():
    base = PRESETS["cifar10-paper"]
    assert config_hash(base) == config_hash(apply_overrides(base, {"workers": "1", "log_every": "7"}))
    assert config_hash(base) != config_hash(apply_overrides(base, {"lr": "0.2"}))
    assert differences(base, apply_overrides(base, {"lr": "0.2", "workers": "1"})) == {"lr": (0.1, 0.2)}


def test_multistep_matches_torch_multisteplr_at_epoch_boundaries():
    cfg = from_preset("cifar10-paper", {"epochs": "12", "milestones": "4,9"})
    sched = Schedule(cfg, steps_per_epoch=7)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    ref = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[4, 9], gamma=0.1)
    for epoch in range(12):
        for s in range(7):  # constant within an epoch
            assert sched.lr(epoch * 7 + s) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        opt.step()
        ref.step()


def test_cosine_matches_torch_per_step_and_warmup_is_linear():
    cfg = from_preset("cifar10-paper", {"epochs": "5", "schedule": "cosine", "final_lr_ratio": "0.01"})
    sched = Schedule(cfg, steps_per_epoch=10)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50, eta_min=0.001)
    for step in range(50):
        assert sched.lr(step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12)
        opt.step()
        ref.step()
    warm = Schedule(apply_overrides(cfg, {"warmup_epochs": "2", "warmup_start": "0.1"}), steps_per_epoch=10)
    assert [warm.lr(s) for s in (0, 10, 20)] == pytest.approx([0.01, 0.055, 0.1])


def test_onecycle_literal_triangle_and_lr_reference_batch():
    cfg = from_preset("cifar10-fast", {"epochs": "10", "warmup_epochs": "2", "warmup_start": "0.2",
                                       "final_lr_ratio": "0.0", "lr": "0.4"})
    sched = Schedule(cfg, steps_per_epoch=4)
    for step in range(40):
        t = step / 4
        expected = 0.4 * (0.2 + 0.8 * t / 2 if t < 2 else 1 - (t - 2) / 8)
        assert sched.lr(step) == pytest.approx(expected, rel=1e-12)
    scaled = Schedule(from_preset("imagenet-paper", {"batch_size": "1024"}), steps_per_epoch=1)
    assert scaled.peak_lr() == pytest.approx(0.4)  # 0.1 per 256 images, He et al.


def test_cli_prints_resolved_preset_with_overrides():
    result = CliRunner().invoke(main, ["--preset", "cifar10-fast", "--lr", "0.3", "--no-nesterov",
                                       "--extra-variants", "rank-005", "--print-config"])
    assert result.exit_code == 0, result.output
    cfg = json.loads(result.output)
    assert cfg["lr"] == 0.3 and cfg["nesterov"] is False and cfg["extra_variants"] == ["rank-005"]
    assert cfg["epochs"] == PRESETS["cifar10-fast"].epochs


def test_cli_reports_bad_values_without_traceback():
    result = CliRunner().invoke(main, ["--lr", "abc", "--print-config"])
    assert result.exit_code == 2 and "--lr 'abc'" in result.output and "Traceback" not in result.output
    listed = CliRunner().invoke(main, ["--list-presets"])
    assert listed.exit_code == 0 and all(name in listed.output for name in PRESETS)


def test_every_field_is_a_cli_option():
    names = {p.name for p in main.params}
    assert set(TrainConfig.__dataclass_fields__) <= names


@pytest.mark.parametrize("flag", ["--data", "--data-root"])
def test_cli_data_option_shares_evaluates_name_and_keeps_the_old_one(flag, tmp_path):
    result = CliRunner().invoke(main, [flag, str(tmp_path), "--print-config"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["data_root"] == str(tmp_path)


def test_cli_requires_an_output_folder():
    result = CliRunner().invoke(main, ["--preset", "cifar10-fast"])
    assert result.exit_code == 2 and "--out is required" in result.output and "Traceback" not in result.output


def test_a_changed_option_on_resume_is_refused_without_advising_resume(tmp_path):
    """`--resume RUN --epochs 3` on a 2-epoch run: the user already resumes, so "(or --resume it)" is no way out;
    the message says a resume keeps the saved config and names the changed option."""
    from rankshard.train import rundir
    rundir.prepare(tmp_path, from_preset("cifar10-paper", {"epochs": "2"}))
    with pytest.raises(ConfigError) as info:
        rundir.prepare(tmp_path, from_preset("cifar10-paper", {"epochs": "3"}), resume=True)
    message = str(info.value)
    assert "epochs: 2 (saved) -> 3" in message and "--resume it" not in message
    assert "saved configuration" in message and "another run folder" in message
    with pytest.raises(ConfigError, match=r"repeat the saved options \(or --resume it\)"):  # a fresh start may resume
        rundir.prepare(tmp_path, from_preset("cifar10-paper", {"epochs": "3"}))
