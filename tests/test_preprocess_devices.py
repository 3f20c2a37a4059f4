"""One placement and device rule for every package and every torchrun rank, in a faked torchrun
environment (RANK / LOCAL_RANK / WORLD_SIZE) on a faked 8-GPU node."""
import pytest
import torch
import torch.distributed as dist
from click.testing import CliRunner

from rankshard.evaluate.distributed import init_from_env
from rankshard.loaders import LoaderConfig, LoaderError
from rankshard.loaders.pipeline import distributed_rank
from rankshard.preprocess import imagejob
from rankshard.preprocess.cli import main as preprocess_main
from rankshard.preprocess.devices import Placement, resolve_device
from rankshard.preprocess.errors import RankshardError
from rankshard.preprocess.rank.engine import RankEngine
from rankshard.train import dist as train_dist

NODE_GPUS, NODES = 8, 2


def _torchrun(monkeypatch, rank: int, gpus: int = NODE_GPUS, world: int = NODES * NODE_GPUS):
    """The environment torchrun gives global rank ``rank`` on nodes of ``gpus`` GPUs (none: a CPU machine)."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank % NODE_GPUS))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: None)  # joining is torch's business


def _preprocess_cli_device(monkeypatch, tmp_path, device: str) -> tuple[str, Placement]:
    """The device and placement ``rankshard-preprocess folder`` hands to the job (the job itself faked)."""
    seen = {}

    def fake_job(source, spec, out, overwrite, policy, placement, show_progress, space_check):
        seen.update(device=spec.device, placement=placement, policy=policy)
        return None

    monkeypatch.setattr(imagejob, "folder_source", lambda *a: None)
    monkeypatch.setattr(imagejob, "run_image_job", fake_job)
    monkeypatch.setattr("rankshard.preprocess.report.print_summary", lambda result: None)
    (tmp_path / "src" / "a").mkdir(parents=True)
    res = CliRunner().invoke(preprocess_main, ["folder", "--source", str(tmp_path / "src"), "--out",
                                               str(tmp_path / "out"), "--device", device, "--strict"])
    assert res.exit_code == 0, res.output
    assert seen["policy"] == "raise"
    return seen["device"], seen["placement"]


@pytest.mark.parametrize("rank", [0, 3, 7, 8, 13, 15])
def test_every_rank_gets_its_own_gpu_from_every_package(monkeypatch, tmp_path, rank):
    _torchrun(monkeypatch, rank)
    mine = torch.device("cuda", rank % NODE_GPUS)
    assert Placement.from_env() == Placement(rank, NODES * NODE_GPUS, rank % NODE_GPUS)
    for choice in ("auto", None, "cuda"):
        assert resolve_device(choice) == mine
    assert _preprocess_cli_device(monkeypatch, tmp_path, "auto") == (str(mine), Placement.from_env())
    assert RankEngine("numpy", "auto").device == mine and RankEngine("numpy").device == mine
    assert torch.device(LoaderConfig(device="auto").device) == mine
    assert distributed_rank(None, None) == (rank, NODES * NODE_GPUS)
    for env in (train_dist.init_distributed("auto"), init_from_env("auto")):
        assert (env.rank, env.world_size, env.local_rank, env.device) == (rank, NODES * NODE_GPUS, rank % 8, mine)


def test_without_cuda_auto_is_the_cpu_everywhere(monkeypatch, tmp_path):
    _torchrun(monkeypatch, 5, gpus=0)
    cpu = torch.device("cpu")
    assert resolve_device("auto") == cpu == RankEngine("numpy").device == train_dist.init_distributed("auto").device
    assert _preprocess_cli_device(monkeypatch, tmp_path, "auto")[0] == "cpu"
    assert LoaderConfig(device="auto").device == "cpu"


def test_an_explicit_index_is_kept_and_the_cpu_can_be_chosen(monkeypatch):
    _torchrun(monkeypatch, 9)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("choice", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_a_clear_error_in_every_package(monkeypatch, choice):
    _torchrun(monkeypatch, 1, gpus=0)
    for ask in (lambda: resolve_device(choice), lambda: Placement.from_env().device(choice),
                lambda: RankEngine("numpy", choice), lambda: LoaderConfig(device=choice),
                lambda: train_dist.init_distributed(choice)):
        with pytest.raises(RankshardError, match=f"--device {choice}: no CUDA device is visible; use --device cpu"):
            ask()


def test_more_local_ranks_than_gpus_is_refused(monkeypatch):
    _torchrun(monkeypatch, 3, gpus=2)  # LOCAL_RANK 3 on a node with 2 GPUs: would otherwise share or crash
    with pytest.raises(RankshardError, match="cuda:3 asked for .*only 2 CUDA device"):
        resolve_device("auto")


@pytest.mark.parametrize("env, match", [({"RANK": "4", "WORLD_SIZE": "4"}, "rank 4 of world size 4"),
                                        ({"RANK": "0", "WORLD_SIZE": "0"}, "rank 0 of world size 0"),
                                        ({"LOCAL_RANK": "-1"}, "local rank -1"),
                                        ({"RANK": "one"}, "must be integers")])
def test_inconsistent_environments_are_refused(monkeypatch, env, match):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RankshardError, match=match):
        Placement.from_env()
    with pytest.raises(LoaderError, match=match):  # the loaders keep their own error type, same message
        distributed_rank(None, None)


def test_an_initialized_process_group_is_the_truth(monkeypatch):
    _torchrun(monkeypatch, 0)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 6)
    monkeypatch.setattr(dist, "get_world_size", lambda: 16)
    assert Placement.from_env().rank == 6 and distributed_rank(None, None) == (6, 16)
