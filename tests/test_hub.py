"""Hub models without the network: a local directory laid out like the Hugging Face cache.

``fake_hub_cache`` writes ``models--ORG--NAME/{blobs,snapshots/<commit>,refs/<ref>}`` the way
huggingface_hub does (snapshot files are symlinks to content-addressed blobs). The real
``snapshot_download`` then resolves ``--model ORG/NAME`` from it in offline mode; a stand-in
``snapshot_download`` that serves files from a local "remote" checks which files llmrun asks for.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmrun.cli.app import run
from llmrun.loading.sources import download

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _with_tokenizer(path: Path) -> Path:
    """Add a byte-level tokenizer.json (one id per UTF-8 byte; the tiny vocabulary has 320 ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path / "tokenizer.json"))
    return path


def fake_hub_cache(cache: Path, repo_id: str, files: Path, *, commit: str = COMMIT, ref: str = "main") -> Path:
    """Put the files of ``files`` into ``cache`` as huggingface_hub would; returns the snapshot dir."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(files.iterdir()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def tiny_repo(tiny_factory) -> Path:
    return _with_tokenizer(tiny_factory("llama", num_key_value_heads=2, max_shard_size="150KB"))


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """Point huggingface_hub at an empty cache in ``tmp_path`` with the network forbidden."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_offline_resolution_through_the_real_snapshot_download(tiny_repo, offline_cache, capsys):
    snapshot = fake_hub_cache(offline_cache, "tiny-org/tiny-llama", tiny_repo)
    assert download("tiny-org/tiny-llama") == snapshot
    argv = ["generate", "hi", "--model", "tiny-org/tiny-llama", "--max-new-tokens", "3", "--no-chat"]
    assert run([*argv, "--device", "cpu", "--temperature", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model_dir"] == str(snapshot) and out["generated_tokens"] == 3


def test_revision_selects_another_snapshot(tiny_repo, offline_cache, tmp_path, capsys):
    fake_hub_cache(offline_cache, "tiny-org/tiny-llama", tiny_repo)
    other = "fedcba9876543210fedcba9876543210fedcba98"
    snapshot = fake_hub_cache(offline_cache, "tiny-org/tiny-llama", tiny_repo, commit=other, ref="v2")
    assert download("tiny-org/tiny-llama", revision="v2") == snapshot
    assert download("tiny-org/tiny-llama", revision=other) == snapshot
    assert run(["pull", "tiny-org/tiny-llama", "--revision", "v2"]) == 0
    assert capsys.readouterr().out.strip() == str(snapshot)


def test_offline_cache_without_the_weights_is_not_a_model(tiny_repo, offline_cache, tmp_path, capsys):
    """A snapshot holding only config.json (e.g. after ``llmrun info``) must not pass for a model."""
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(tiny_repo / "config.json", partial / "config.json")
    fake_hub_cache(offline_cache, "tiny-org/partial", partial)
    assert run(["info", "--model", "tiny-org/partial", "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"] == 2
    assert run(["pull", "tiny-org/partial"]) == 2
    assert "not in the local Hugging Face cache" in capsys.readouterr().err


def test_pull_offline_and_absent_is_one_line_exit_2(tmp_path):
    """The real environment variables, in a fresh process: HF_HUB_OFFLINE=1 and an empty HF_HUB_CACHE."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path), "LLMRUN_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "llmrun", "pull", "nobody/absent-model"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nobody/absent-model" in lines[0] and "HF_HUB_OFFLINE" in lines[0]
    assert result.stdout == ""


def test_pull_refuses_what_is_not_a_repo_id(capsys):
    assert run(["pull", "./some/dir/"]) == 2
    assert "ORG/NAME" in capsys.readouterr().err


class FakeRemote:
    """A stand-in for ``snapshot_download`` serving a local "remote" repo, recording what was asked."""

    def __init__(self, remote: Path, snapshot: Path) -> None:
        self.remote, self.snapshot, self.calls = remote, snapshot, []

    def __call__(self, repo_id, *, revision=None, allow_patterns=None, local_files_only=False):
        from huggingface_hub.utils import filter_repo_objects

        self.calls.append(list(allow_patterns))
        self.snapshot.mkdir(parents=True, exist_ok=True)
        names = [p.name for p in self.remote.iterdir()]
        for name in filter_repo_objects(names, allow_patterns=allow_patterns):
            shutil.copy(self.remote / name, self.snapshot / name)
        return str(self.snapshot)


def _serve(monkeypatch, remote: Path, tmp_path: Path) -> FakeRemote:
    import huggingface_hub

    fake = FakeRemote(remote, tmp_path / "snapshot")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return fake


def test_download_takes_only_the_indexed_shards_config_and_tokenizer(tiny_repo, tmp_path, monkeypatch):
    for junk in ("pytorch_model.bin", "consolidated.safetensors", "consolidated.00.pth", "training_args.pt"):
        (tiny_repo / junk).write_bytes(b"\x00" * 16)
    (tiny_repo / "README.md").write_text("# tiny")
    fake = _serve(monkeypatch, tiny_repo, tmp_path)
    path = download("tiny-org/tiny-llama")
    got = {p.name for p in path.iterdir()}
    shards = {p.name for p in tiny_repo.glob("model-*.safetensors")}
    assert len(shards) >= 3
    assert got == shards | {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json"}
    assert all(not any(p.endswith((".bin", ".pt", ".pth")) for p in call) for call in fake.calls)


def test_download_of_an_unsharded_repo_skips_a_consolidated_copy(tiny_factory, tmp_path, monkeypatch):
    remote = _with_tokenizer(tiny_factory("llama"))
    shutil.copy(remote / "model.safetensors", remote / "consolidated.safetensors")
    _serve(monkeypatch, remote, tmp_path)
    got = {p.name for p in download("tiny-org/tiny-llama").iterdir()}
    assert "model.safetensors" in got and "consolidated.safetensors" not in got


def test_random_weights_from_the_hub_fetch_no_weights(tiny_repo, tmp_path, monkeypatch, capsys):
    fake = _serve(monkeypatch, tiny_repo, tmp_path)
    argv = ["generate", "hi", "--model", "tiny-org/tiny-llama", "--random-weights", "-n", "2", "--no-chat"]
    assert run([*argv, "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["generated_tokens"] == 2
    assert not list(fake.snapshot.glob("*.safetensors"))
