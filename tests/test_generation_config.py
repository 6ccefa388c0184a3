"""Sampling defaults from a model's generation_config.json: flags win, then the file, then llama.cpp's."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest
from badinputs import build_model

from llmrun.cli.app import run
from llmrun.errors import LlmrunError
from llmrun.generation.generation_config import FILE_NAME, sampling_params
from llmrun.generation.sampling import SamplingParams

LLAMA_CPP = SamplingParams()
FULL = {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.9, "min_p": 0.0, "repetition_penalty": 1.1}


def _dir(tmp_path: Path, config: dict | None) -> Path:
    if config is not None:
        (tmp_path / FILE_NAME).write_text(json.dumps(config))
    return tmp_path


def test_no_file_keeps_llama_cpp_defaults(tmp_path):
    p = LLAMA_CPP
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty) == (0.8, 40, 0.95, 0.05, 1.0)
    assert sampling_params({}, tmp_path) == LLAMA_CPP
    assert sampling_params({"top_k": 5, "seed": 3}, tmp_path) == SamplingParams(top_k=5, seed=3)


def test_a_file_without_sampling_keys_keeps_llama_cpp_defaults(tmp_path):
    silent = {"bos_token_id": 1, "eos_token_id": [2, 3], "top_p": None, "transformers_version": "4.45.0"}
    assert sampling_params({}, _dir(tmp_path, silent)) == LLAMA_CPP


def test_the_file_fills_what_no_flag_gives(tmp_path):
    model = _dir(tmp_path, FULL)
    assert sampling_params({}, model) == SamplingParams(
        temperature=0.6, top_k=20, top_p=0.9, min_p=0.0, repetition_penalty=1.1
    )
    given = {"temperature": 1.0, "top_p": 1.0, "seed": 7}
    assert sampling_params(given, model) == SamplingParams(
        temperature=1.0, top_k=20, top_p=1.0, min_p=0.0, repetition_penalty=1.1, seed=7
    )


def test_only_the_keys_in_the_file_change(tmp_path):
    assert sampling_params({}, _dir(tmp_path, {"do_sample": True, "temperature": 0.7})) == SamplingParams(
        temperature=0.7
    )


def test_do_sample_false_is_greedy_unless_a_temperature_is_given(tmp_path):
    model = _dir(tmp_path, {"do_sample": False, "temperature": 0.6, "top_p": 0.9})
    assert sampling_params({}, model) == SamplingParams(temperature=0.0, top_p=0.9)
    assert sampling_params({"temperature": 0.7}, model) == SamplingParams(temperature=0.7, top_p=0.9)


@pytest.mark.parametrize(
    ("config", "pattern"),
    [
        ({"top_p": 0.0}, r"top_p 0\.0 is out of range \(--top-p must be in \(0, 1\].*pass --top-p"),
        ({"temperature": -1}, r"temperature -1 is out of range .*pass --temperature"),
        ({"top_k": 40.5}, r"top_k must be an integer, got 40\.5; fix the file or pass --top-k"),
        ({"min_p": "0.1"}, r"min_p must be a number, got '0\.1'; fix the file or pass --min-p"),
        ({"repetition_penalty": True}, r"repetition_penalty must be a number, got True"),
    ],
)
def test_a_bad_value_names_the_file_key_and_flag_unless_the_flag_overrides_it(tmp_path, config, pattern):
    model = _dir(tmp_path, config)
    with pytest.raises(LlmrunError, match=pattern) as info:
        sampling_params({}, model)
    assert str(info.value).startswith(str(model / FILE_NAME))
    (key,) = config
    assert sampling_params({key: getattr(LLAMA_CPP, key)}, model) == LLAMA_CPP


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ('{"do_sample": "yes"}', r"do_sample must be true or false, got 'yes'"),
        ("{", r"is corrupt \(Expecting"),
        ("[1, 2]", r"is corrupt \(not a JSON object\)"),
    ],
)
def test_a_corrupt_file_is_refused(tmp_path, text, pattern):
    (tmp_path / FILE_NAME).write_text(text)
    with pytest.raises(LlmrunError, match=pattern):
        sampling_params({}, tmp_path)


# ---------------------------------------------------------------- through the CLI, on a tiny real model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny Llama with a byte-level tokenizer and a ChatML template; no generation_config.json."""
    return build_model(tmp_path_factory.mktemp("genconfig") / "tiny")


def _model(tiny: Path, tmp_path: Path, config: dict) -> Path:
    return _dir(shutil.copytree(tiny, tmp_path / "model"), config)


def _generate_json(model: Path, capsys, *flags: str) -> dict:
    argv = ["generate", "hello there", "--model", str(model), "--device", "cpu", "--no-chat", "--json"]
    code = run([*argv, "-n", "12", "--ignore-eos", *flags])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def _generate(model: Path, capsys, *flags: str) -> list[int]:
    return _generate_json(model, capsys, *flags)["tokens"]


def _chat(model: Path, capsys, monkeypatch, *flags: str) -> str:
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\n/exit\n"))
    code = run(["chat", "--model", str(model), "--device", "cpu", "-n", "12", *flags])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_generate_decodes_greedily_when_the_model_says_do_sample_false(tiny, tmp_path, capsys):
    sampled = [_generate(tiny, capsys, "--seed", seed) for seed in ("1", "2")]
    assert sampled[0] != sampled[1]  # without the file, llama.cpp's defaults sample
    greedy = _generate(tiny, capsys, "--temperature", "0")
    model = _model(tiny, tmp_path, {"do_sample": False})
    assert _generate(model, capsys, "--seed", "1") == _generate(model, capsys, "--seed", "2") == greedy
    assert _generate(model, capsys, "--temperature", "0.8", "--seed", "1") == sampled[0]  # the flag wins


def test_generate_json_reports_the_sampling_settings_used(tiny, tmp_path, capsys):
    model = _model(tiny, tmp_path, {"temperature": 0.3, "top_k": 7})
    sampling = _generate_json(model, capsys, "--top-k", "3", "--seed", "5")["sampling"]
    defaults = SamplingParams()
    assert sampling == {
        "temperature": 0.3,  # the file
        "top_k": 3,  # the flag
        "top_p": defaults.top_p,
        "min_p": defaults.min_p,
        "repetition_penalty": defaults.repetition_penalty,
        "seed": 5,
    }


def test_chat_decodes_greedily_when_the_model_says_do_sample_false(tiny, tmp_path, capsys, monkeypatch):
    sampled = [_chat(tiny, capsys, monkeypatch, "--seed", seed) for seed in ("1", "2")]
    assert sampled[0] != sampled[1]
    greedy = _chat(tiny, capsys, monkeypatch, "--temperature", "0")
    model = _model(tiny, tmp_path, {"do_sample": False})
    assert _chat(model, capsys, monkeypatch, "--seed", "1") == _chat(model, capsys, monkeypatch, "--seed", "2")
    assert _chat(model, capsys, monkeypatch, "--seed", "1") == greedy


def test_a_bad_file_value_is_one_line_exit_2(tiny, tmp_path, capsys):
    model = _model(tiny, tmp_path, {"do_sample": True, "top_p": 1.5})
    assert run(["generate", "hi", "--model", str(model), "--device", "cpu", "--no-chat", "-n", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("llmrun: error: ") and "pass --top-p" in err


def test_a_run_without_a_seed_reports_the_one_it_drew_and_it_reproduces(tiny, capsys):
    first = _generate_json(tiny, capsys)
    seed = first["sampling"]["seed"]
    assert isinstance(seed, int)
    assert _generate_json(tiny, capsys, "--seed", str(seed))["tokens"] == first["tokens"]


def test_seed_minus_one_draws_a_random_seed(tiny, capsys):
    seeds = [_generate_json(tiny, capsys, "-s", "-1")["sampling"]["seed"] for _ in range(2)]
    assert all(isinstance(s, int) and s >= 0 for s in seeds) and seeds[0] != seeds[1]
