"""configs/ ships with the package: presets and the GPU spec table are found in a checkout and in a wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import llmrun
from llmrun.loading.presets import presets_dir
from llmrun.paths import configs_dir
from llmrun.profiler.roofs import table_path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = Path(llmrun.__file__).parent


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_the_lookup_reads_the_repository_configs_through_the_package(monkeypatch):
    monkeypatch.delenv("LLMRUN_PRESETS_DIR", raising=False)
    monkeypatch.delenv("LLMRUN_HARDWARE_TABLE", raising=False)
    assert configs_dir() == PACKAGE / "configs"
    assert configs_dir().resolve() == REPO / "configs"  # the link, so configs/ stays the only copy
    assert presets_dir() == configs_dir() / "models" and table_path() == configs_dir() / "hardware" / "gpus.json"
    assert table_path().is_file() and len(list(presets_dir().glob("*.json"))) >= 11


def test_package_data_covers_every_config_file():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["llmrun"]
    shipped = {p.relative_to(PACKAGE).as_posix() for pattern in patterns for p in PACKAGE.glob(pattern)}
    assert {f"configs/{name}" for name in _files(REPO / "configs")} <= shipped


def test_a_wheel_carries_the_configs_and_its_install_finds_them(tmp_path):
    pytest.importorskip("setuptools")
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("llmrun", "configs"):
        shutil.copytree(REPO / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    subprocess.run([*build, str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("llmrun-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"llmrun/configs/{name}" for name in _files(REPO / "configs")} <= names

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {k: v for k, v in os.environ.items() if k not in ("LLMRUN_PRESETS_DIR", "LLMRUN_HARDWARE_TABLE")}
    env["PYTHONPATH"] = str(site)  # ahead of the editable install of the checkout
    probe = (
        "import llmrun; from llmrun.loading.presets import load_preset, preset_names; "
        "from llmrun.profiler.roofs import load_table; "
        "print(llmrun.__file__); print(len(preset_names())); "
        "print(load_preset('preset:llama-3.1-8b').args.hidden_size); print(len(load_table()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=True
    ).stdout.split()
    assert Path(out[0]).is_relative_to(site)
    assert int(out[1]) == len(list((REPO / "configs" / "models").glob("*.json")))
    assert out[2] == "4096" and int(out[3]) > 0
