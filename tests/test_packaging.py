"""Packaging: the stage folders install under ``rankshard.`` only, beside Hugging Face ``evaluate``.

The first release installed ``preprocess``, ``loaders``, ``train`` and ``evaluate`` as top-level packages
and overwrote HF ``evaluate``. These tests build the real wheel, read its file list, install it into a fresh
virtual environment that also sees HF ``evaluate``, and import both.
"""
from __future__ import annotations

import configparser
import importlib.metadata
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("preprocess", "loaders", "train", "evaluate")


def _declared_packages() -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return {line.strip() for line in cfg["options"]["packages"].splitlines() if line.strip()}


def _package_folders() -> set[str]:
    found = {"rankshard"}
    for stage in STAGES:
        for init in (ROOT / stage).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT).parts
            found.add(".".join(("rankshard", *rel)))
    return found


def test_setup_cfg_lists_every_package_folder():
    assert _declared_packages() == _package_folders()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the source tree (so nothing is written into the checkout)."""
    src = tmp_path_factory.mktemp("src") / "rankshard"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                                            "__pycache__", ".pytest_cache", "benchmarks", "tests"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(src)], check=True)
    (found,) = out.glob("rankshard-*.whl")
    return found


def test_wheel_puts_only_rankshard_at_the_top_level(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    dist_info = "-".join(wheel.name.split("-")[:2]) + ".dist-info"
    assert top == {"rankshard", dist_info}
    for stage in STAGES:  # every stage with its subpackages and its __main__ (python -m rankshard.<stage>)
        assert f"rankshard/{stage}/__init__.py" in names
        assert stage == "loaders" or f"rankshard/{stage}/__main__.py" in names
    assert "rankshard/evaluate/rig/command.py" in names and "rankshard/preprocess/format/tar.py" in names
    entry_points = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    for script in ("rankshard-preprocess", "rankshard-train", "rankshard-evaluate"):
        assert f"{script} = rankshard." in entry_points


def test_wheel_installs_beside_hugging_face_evaluate(wheel, tmp_path):
    """A fresh venv with our wheel installed; the test environment's site-packages (torch, HF evaluate) are
    visible behind it through a .pth line. Run from tmp_path so the checkout's folders are not on sys.path."""
    # Looked up by distribution, not imported: from the repository root the checkout's own evaluate/ folder
    # is on sys.path and shadows it (a development-only effect; the wheel has no such folder).
    try:
        importlib.metadata.distribution("evaluate")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("HF evaluate is missing: it is part of the test extra (pip install -e '.[test]')")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                           text=True).strip())
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(purelib), str(wheel)],
                   check=True)
    (purelib / "zz_parent_env.pth").write_text(sysconfig.get_path("purelib") + "\n")
    probe = ("import evaluate, rankshard.evaluate, rankshard.evaluate.cli, rankshard.preprocess.cli, "
             "rankshard.train.cli, rankshard.loaders\n"
             "assert hasattr(evaluate, 'load'), evaluate.__file__\n"
             f"assert rankshard.evaluate.__file__.startswith({str(purelib)!r}), rankshard.evaluate.__file__\n"
             "print('ok', evaluate.__file__)")
    result = subprocess.run([str(python), "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    run = subprocess.run([str(python), "-m", "rankshard.evaluate", "--help"], cwd=tmp_path, capture_output=True,
                         text=True)
    assert run.returncode == 0 and "spectrum" in run.stdout, run.stderr
