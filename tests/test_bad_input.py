"""The bad-input corpus (``tests/badinputs.py``) through the real CLI.

Every case must exit with its exact code and print one ``llmrun: error: ...`` line on stderr naming the
problem: no traceback, nothing on stdout, no partial output left behind. Most cases run in-process
through ``llmrun.cli.app.run``; a few run as ``python -m llmrun`` to show that a real process prints
no traceback either.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from badinputs import CASES, Case, build_model, check_one_line, gen

from llmrun.cli.app import run

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def valid_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny valid model every case starts from (never modified: cases work on copies)."""
    return build_model(tmp_path_factory.mktemp("valid") / "tiny")


@pytest.fixture
def workdir(tmp_path: Path, valid_model: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A fresh copy of the valid model and a scratch directory; llmrun's cache is under the scratch dir."""
    model = shutil.copytree(valid_model, tmp_path / "model")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("LLMRUN_HOME", str(scratch / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LLMRUN_DEBUG", raising=False)
    return model, scratch


def _run(argv: list[str], stdin: bytes | None, monkeypatch: pytest.MonkeyPatch, capsys) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    code = run(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_corpus_is_large_and_named_uniquely():
    ids = [c.id for c in CASES]
    assert len(ids) >= 30
    assert len(set(ids)) == len(ids)


def test_valid_model_runs(workdir, monkeypatch, capsys):
    """The corpus's starting point is valid: every failure below comes from the one thing a case breaks."""
    model, _ = workdir
    code, out, err = _run([*gen(model), "--json", "--temperature", "0"], None, monkeypatch, capsys)
    assert code == 0, err
    assert json.loads(out)["generated_tokens"] >= 1


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case: Case, workdir, monkeypatch, capsys):
    model, scratch = workdir
    argv = case.setup(model, scratch)
    code, out, err = _run(argv, case.stdin, monkeypatch, capsys)
    assert code == case.code, err
    line = check_one_line(err, case.message)
    assert line.startswith("llmrun: error: ")
    assert out == ""
    for output in case.outputs:
        assert not (scratch / output).exists(), output
    leftovers = [p.name for p in scratch.rglob("*") if p.name.endswith((".importing", ".old"))]
    assert leftovers == []


@pytest.mark.parametrize("model_exists", [True, False])
def test_unknown_cpu_kernel_choice_fails_before_loading(workdir, monkeypatch, capsys, model_exists):
    """Said first: before the model is even looked for (a missing one would be the error otherwise)."""
    model, scratch = workdir
    monkeypatch.setenv("LLMRUN_CPU_GEMV", "avx9")
    code, out, err = _run(gen(model if model_exists else scratch / "no-such-model"), None, monkeypatch, capsys)
    assert code == 2 and out == ""
    check_one_line(err, r"LLMRUN_CPU_GEMV='avx9' is not a kernel: set it to auto, conv, packed, onednn, native or mm")


def test_prompt_longer_than_context_runs_with_truncate(workdir, monkeypatch, capsys):
    model, _ = workdir
    # --ignore-eos: the random model's sampled tokens may include its end-of-sequence id (it did, once in CI)
    flags = [*gen(model, prompt="x y " * 100), "--truncate", "--json", "--ignore-eos"]
    code, out, err = _run(flags, None, monkeypatch, capsys)
    assert code == 0, err
    result = json.loads(out)
    # the last 126 tokens: room for the 2 new ones (-n 2) in the 128-token context
    assert result["prompt_tokens"] == 126 and result["generated_tokens"] == 2 and result["finish_reason"] == "length"


def test_truncate_in_chat_mode_cuts_the_message_not_the_template(workdir, monkeypatch, capsys):
    model, _ = workdir
    args = ["generate", "x y " * 100, "--model", str(model), "--device", "cpu", "-n", "8", "--chat", "--json"]
    code, out, err = _run([*args, "--system", "be brief", "--truncate"], None, monkeypatch, capsys)
    assert code == 0, err
    result = json.loads(out)
    assert 128 - 8 - 4 <= result["prompt_tokens"] <= 128 - 8

    from llmrun.generation.prompt import PromptSettings, prompt_ids
    from llmrun.generation.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(model)
    ids = prompt_ids(tokenizer, "x y " * 100, PromptSettings(True, "be brief", True), 128, "tiny", 8)
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("x y <|im_end|>\n<|im_start|>assistant\n")  # the end of the message is kept


def test_ctx_size_bounds_the_run(workdir, monkeypatch, capsys):
    model, _ = workdir
    code, out, err = _run([*gen(model, prompt="x y " * 20), "--ctx-size", "16", "--json"], None, monkeypatch, capsys)
    assert code == 2
    check_one_line(err, r"the prompt is \d+ tokens but the context \(--ctx-size\) is 16")
    code, out, err = _run(
        [*gen(model, prompt="x y " * 20), "-c", "16", "--truncate", "--json"], None, monkeypatch, capsys
    )
    assert code == 0, err
    assert json.loads(out)["prompt_tokens"] == 14


def test_debug_shows_the_traceback(workdir, monkeypatch):
    model, _ = workdir
    (model / "config.json").unlink()
    monkeypatch.setenv("LLMRUN_DEBUG", "1")
    from llmrun.errors import LlmrunError

    with pytest.raises(LlmrunError, match="config.json is missing"):
        run(gen(model))


def test_internal_error_is_exit_1_with_a_pointer_to_debug(workdir, monkeypatch, capsys):
    model, _ = workdir
    import llmrun.generation.generate

    def broken(*args, **kwargs):
        raise RuntimeError("something inside broke")

    monkeypatch.setattr(llmrun.generation.generate, "prefill", broken)
    code, out, err = _run(gen(model), None, monkeypatch, capsys)
    assert code == 1
    line = check_one_line(err, r"internal error: RuntimeError: something inside broke")
    assert "LLMRUN_DEBUG=1" in line


def _subprocess(argv: list[str], tmp: Path, stdin: bytes = b"", **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "LLMRUN_DEBUG"}
    environ.update({"LLMRUN_HOME": str(tmp / "home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **env})
    return subprocess.run(
        [sys.executable, "-m", "llmrun", *argv], input=stdin, capture_output=True, env=environ, timeout=300
    )


SUBPROCESS_CASES = (
    "config-invalid-json",
    "tensor-wrong-shape",
    "stdin-not-utf8",
    "prompt-argument-not-utf8",
    "top-k-negative",
    "gguf-truncated",
)


@pytest.mark.parametrize("case", [c for c in CASES if c.id in SUBPROCESS_CASES], ids=lambda c: c.id)
def test_real_process_prints_one_line_and_exits_2(case: Case, workdir):
    model, scratch = workdir
    proc = _subprocess(case.setup(model, scratch), scratch, case.stdin or b"")
    assert proc.returncode == case.code, proc.stderr.decode()
    check_one_line(proc.stderr.decode(), case.message)
    assert proc.stdout == b""
    for output in case.outputs:
        assert not (scratch / output).exists(), output


def test_real_process_with_debug_prints_the_traceback(workdir):
    model, scratch = workdir
    (model / "tokenizer.json").unlink()
    proc = _subprocess(gen(model), scratch, LLMRUN_DEBUG="1")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr.decode() and "tokenizer.json is missing" in proc.stderr.decode()


def test_unreachable_hub_in_offline_mode(workdir):
    _, scratch = workdir
    proc = _subprocess(gen(Path("nobody-xyz/no-such-model")), scratch, HF_HOME=str(scratch / "hf"))
    assert proc.returncode == 2
    check_one_line(proc.stderr.decode(), r"not in the local Hugging Face cache and the hub cannot be reached")


def test_unreachable_hub_without_offline_flag(workdir):
    _, scratch = workdir
    proc = _subprocess(
        gen(Path("nobody-xyz/no-such-model")),
        scratch,
        HF_HOME=str(scratch / "hf"),
        HF_HUB_OFFLINE="0",
        HF_ENDPOINT="http://127.0.0.1:9",
        HF_HUB_ETAG_TIMEOUT="2",
        HF_HUB_DOWNLOAD_TIMEOUT="2",
    )
    assert proc.returncode == 2, proc.stderr.decode()
    check_one_line(proc.stderr.decode(), r"nobody-xyz/no-such-model is not in the local .* hub cannot be reached")


UNSAFE_SOURCE = {
    "torch.load": r"\btorch\.load\s*\(",
    "a pickle import": r"^\s*(import|from)\s+(pickle|cPickle|dill|joblib)\b",
    "pickle.load": r"\bpickle\.(loads?|Unpickler)\b",
    "trust_remote_code": r"trust_remote_code",
    "eval/exec": r"(?<![.\w])(eval|exec)\s*\(",
    "an unsandboxed Jinja2 environment": r"(?<!Sandboxed)Environment\s*\(",
}


@pytest.mark.parametrize("pattern", UNSAFE_SOURCE.values(), ids=UNSAFE_SOURCE.keys())
def test_no_source_line_unpickles_or_runs_code(pattern):
    hits = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in sorted((REPO / "llmrun").rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(pattern, line)
    ]
    assert hits == []


def test_generate_and_import_run_with_unpickling_disabled(workdir, monkeypatch, capsys):
    """At run time too: nothing on the load, generate or GGUF import paths calls an unpickler."""
    import torch
    from badinputs import write_gguf

    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    for owner, name in [(torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")]:
        monkeypatch.setattr(owner, name, refuse)
    model, scratch = workdir
    assert run([*gen(model), "--chat"]) == 0, capsys.readouterr().err
    gguf_file = write_gguf(scratch / "tiny.gguf")
    assert run(["generate", "the", "--model", str(gguf_file), "--device", "cpu", "--no-chat", "-n", "2"]) == 0
