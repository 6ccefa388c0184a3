"""The real CLI, end to end: in-process through ``run`` and as a subprocess, on the default model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llmrun.cli.app import run

JSON_FIELDS = {
    "text": str,
    "tokens": list,
    "prompt_tokens": int,
    "generated_tokens": int,
    "finish_reason": str,
    "ttft_s": float,
    "prefill_tok_s": float,
    "decode_tok_s": float,
    "model": str,
    "device": str,
    "dtype": str,
}


@pytest.mark.slow
def test_generate_json_has_the_documented_fields(smollm2_dir, capsys):
    code = run(
        ["generate", "What is the capital of France?", "--temperature", "0", "-n", "24", "--device", "cpu", "--json"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    for field, kind in JSON_FIELDS.items():
        assert isinstance(result[field], kind), field
    assert "Paris" in result["text"]
    assert result["finish_reason"] in ("stop", "length")
    assert result["generated_tokens"] == len(result["tokens"]) <= 24
    assert result["device"] == "cpu" and result["dtype"] == "fp32"
    assert result["prompt_tokens"] > 5


@pytest.mark.slow
def test_generate_ignore_eos_runs_to_max_new_tokens(smollm2_dir, capsys):
    code = run(["generate", "Hi", "--temperature", "0", "-n", "40", "--ignore-eos", "--json", "--device", "cpu"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    assert result["generated_tokens"] == 40 and result["finish_reason"] == "length"


@pytest.mark.slow
@pytest.mark.parametrize("command", ["generate", "perplexity"])
def test_threads_flag_sets_torch_threads(smollm2_dir, tmp_path, capsys, command):
    import torch

    args = ["Hi", "-n", "2", "--temperature", "0"] if command == "generate" else [str(tmp_path / "t.txt")]
    (tmp_path / "t.txt").write_text("The capital of France is Paris.", encoding="utf-8")
    before = torch.get_num_threads()
    try:
        code = run([command, *args, "--threads", "1", "--json", "--device", "cpu"])
        assert code == 0, capsys.readouterr().err
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_stop_string_ends_generation(smollm2_dir, capsys):
    args = ["generate", "Count from 1 to 20, separated by commas.", "--temperature", "0", "-n", "60"]
    code = run([*args, "--stop", "5", "--json", "--device", "cpu"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    assert result["finish_reason"] == "stop" and "5" not in result["text"] and "4" in result["text"]
    # the statistics are read at the stop string, before the token generator is finalised
    assert result["generated_tokens"] > 2 and result["decode_s"] > 0 and result["decode_tok_s"] > 0


@pytest.mark.slow
def test_subprocess_streams_text_and_stats_from_stdin(smollm2_dir):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run(
        [sys.executable, "-m", "llmrun", "generate", "-", "--temperature", "0", "-n", "16", "--device", "cpu"],
        input=b"What is the capital of France?",
        capture_output=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert "Paris" in proc.stdout.decode()
    stats = proc.stderr.decode().strip().splitlines()[-1]
    assert stats.startswith("prompt ") and "decode" in stats and "tok/s" in stats


def test_bad_flag_is_one_line_exit_2(capsys):
    assert run(["generate", "hi", "--top-p", "1.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--top-p" in err[0] and "Traceback" not in err[0]


def test_unknown_option_is_one_line_exit_2(capsys):
    assert run(["generate", "hi", "--no-such-flag"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--no-such-flag" in err[0]


def test_cuda_without_gpu_is_refused(capsys):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert run(["generate", "hi", "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_version_and_short_help(capsys):
    import llmrun

    assert run(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"llmrun {llmrun.__version__}"
    for command in ("generate", "chat", "perplexity", "info", "profile", "bench", "compare", "peaks"):
        assert run([command, "-h"]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"Usage: llmrun {command}"), out[:200]
        assert f"Examples:\n    llmrun {command}" in out  # the module docstring's examples, unwrapped


def test_llama_cpp_flag_names_are_aliases(tmp_path, capsys):
    """``--temp``, ``--repeat-penalty``, ``-s`` and ``-c`` mean what llama.cpp users expect."""
    from badinputs import build_model

    model = build_model(tmp_path / "tiny")
    base = ["generate", "hi", "-m", str(model), "--device", "cpu", "--no-chat", "-n", "4", "--json"]
    assert run([*base, "--temp", "0.7", "--repeat-penalty", "1.3", "-s", "5", "-c", "64"]) == 0
    sampling = json.loads(capsys.readouterr().out)["sampling"]
    assert (sampling["temperature"], sampling["repetition_penalty"], sampling["seed"]) == (0.7, 1.3, 5)
