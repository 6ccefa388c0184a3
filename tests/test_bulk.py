"""Prompts in bulk: left padding in the executor, the batched loop, and ``generate --prompts-file``.

The batched results must be the one-by-one results: a padded row's logits equal the row alone
(fp32 tolerance), greedy output is the same token for token, and a row's own seed draws what a
one-by-one run with that seed draws. The tiny models get larger weights than transformers' default
(``initializer_range``) so that no two logits are close enough for rounding to swap the argmax.
"""

from __future__ import annotations

import json

import pytest
import torch

from llmrun.cli.app import run
from llmrun.generation.batch import BatchRow, generate_batch
from llmrun.generation.generate import GenerationStats, generate_tokens
from llmrun.generation.sampling import Sampler, SamplingParams
from llmrun.model.executor import decode_step, forward, make_cache, prefill

GREEDY = SamplingParams(temperature=0.0)
PROMPTS = [[5, 9, 2], list(range(10, 21)), [7], [3, 1, 4, 1, 5, 9]]  # lengths 3, 11, 1, 6


@pytest.fixture
def tiny_model(tiny_factory):
    from llmrun.loading.loader import load_model

    def make(model_type: str = "llama", **overrides):
        path = tiny_factory(model_type, initializer_range=0.3, **overrides)
        return load_model(path, torch.device("cpu"), torch.float32)

    return make


def _padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids left-padded with id 0, and the padding (B,)."""
    longest = max(map(len, prompts))
    tokens = torch.zeros(len(prompts), longest, dtype=torch.long)
    for b, ids in enumerate(prompts):
        tokens[b, longest - len(ids) :] = torch.tensor(ids)
    return tokens, torch.tensor([longest - len(ids) for ids in prompts])


@pytest.mark.parametrize(
    "model_type, overrides",
    [
        ("llama", {}),
        ("mistral", {"sliding_window": 4, "num_key_value_heads": 2}),
        ("qwen2", {"num_key_value_heads": 2}),
    ],
)
def test_padded_rows_have_the_logits_of_the_row_alone(tiny_model, model_type, overrides):
    model = tiny_model(model_type, **overrides)
    tokens, padding = _padded(PROMPTS)
    batched = forward(model, tokens, padding=padding)
    for b, ids in enumerate(PROMPTS):
        alone = forward(model, torch.tensor([ids]))[0]
        torch.testing.assert_close(batched[b, padding[b] :], alone, rtol=1e-4, atol=1e-4)

    cache = make_cache(model, len(PROMPTS), tokens.shape[1] + 3)
    logits = [prefill(model, tokens, cache, padding=padding)]
    for step in range(3):
        logits.append(decode_step(model, torch.tensor([11 + step] * len(PROMPTS)), cache))
    for b, ids in enumerate(PROMPTS):
        own = make_cache(model, 1, len(ids) + 3)
        alone = [prefill(model, torch.tensor([ids]), own)]
        alone += [decode_step(model, torch.tensor([11 + step]), own) for step in range(3)]
        for got, want in zip(logits, alone, strict=True):
            torch.testing.assert_close(got[b], want[0], rtol=1e-4, atol=1e-4)


def test_padding_is_forgotten_on_reset(tiny_model):
    model = tiny_model()
    tokens, padding = _padded(PROMPTS[:2])
    cache = make_cache(model, 2, 16)
    prefill(model, tokens, cache, padding=padding)
    assert cache.padding is not None and bool(cache.padding.any())
    cache.reset()
    assert cache.padding is None


def _one_by_one(model, prompts, params, max_new, stop_ids=()):
    out = []
    for ids, p, n in zip(prompts, params, max_new, strict=True):
        stats = GenerationStats()
        tokens = list(generate_tokens(model, ids, Sampler(p), max_new_tokens=n, stop_ids=stop_ids, stats=stats))
        out.append((tokens, stats.finish_reason))
    return out


def _batched(model, prompts, params, max_new, stop_ids=()):
    rows = [BatchRow(ids, Sampler(p), n) for ids, p, n in zip(prompts, params, max_new, strict=True)]
    generate_batch(model, rows, stop_ids=stop_ids)
    return [(row.tokens, row.stats.finish_reason) for row in rows]


@pytest.mark.parametrize("fast", ["1", "0"])
def test_batched_greedy_equals_one_by_one(tiny_model, monkeypatch, fast):
    monkeypatch.setenv("LLMRUN_FAST", fast)
    model = tiny_model(max_position_embeddings=24)
    max_new = [6, 20, 2, 9]  # the second row runs into the context (11 + 13 = 24)
    params = [GREEDY] * len(PROMPTS)
    want = _one_by_one(model, PROMPTS, params, max_new)
    assert [reason for _, reason in want] == ["length", "context", "length", "length"]
    assert _batched(model, PROMPTS, params, max_new) == want
    same_length = [ids[:3] for ids in (PROMPTS[0], PROMPTS[1], PROMPTS[3])]  # no padding: the fast path decodes
    assert _batched(model, same_length, params[:3], [5] * 3) == _one_by_one(model, same_length, params[:3], [5] * 3)


def test_batched_rows_stop_at_their_own_stop_id(tiny_model):
    model = tiny_model()
    free = _one_by_one(model, PROMPTS, [GREEDY] * 4, [8] * 4)
    stop = {free[1][0][3], free[3][0][0]}  # ids that end rows 1 and 3 early (and maybe others)
    want = _one_by_one(model, PROMPTS, [GREEDY] * 4, [8] * 4, stop_ids=stop)
    assert "stop" in {reason for _, reason in want}
    assert _batched(model, PROMPTS, [GREEDY] * 4, [8] * 4, stop_ids=stop) == want


def test_each_row_samples_with_its_own_settings_and_seed(tiny_model):
    model = tiny_model()
    params = [
        SamplingParams(temperature=0.9, seed=1),
        SamplingParams(temperature=1.2, top_k=0, top_p=1.0, min_p=0.0, seed=2),
        GREEDY,
        SamplingParams(temperature=0.7, repetition_penalty=1.5, seed=1),
    ]
    max_new = [8, 8, 4, 8]
    want = _one_by_one(model, PROMPTS, params, max_new)
    assert _batched(model, PROMPTS, params, max_new) == want
    assert want[0][0] != want[3][0]  # same seed, other settings: other tokens


# ---------------------------------------------------------------- the command


@pytest.fixture
def model_dir(tmp_path):
    from badinputs import build_model

    return build_model(tmp_path / "tiny", initializer_range=0.3)


def _lines(items) -> str:
    return "".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in items)


def _bulk(model_dir, path, capsys, *flags) -> list[dict]:
    argv = ["generate", "--prompts-file", str(path), "-m", str(model_dir), "--device", "cpu", "-n", "5", *flags]
    assert run(argv) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    assert "prompts/s" in captured.err and "tok/s" in captured.err
    return [json.loads(line) for line in captured.out.splitlines()]


def test_prompts_file_batches_equal_one_by_one_in_input_order(model_dir, tmp_path, capsys):
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        _lines([
            {"prompt": "The capital of France is", "id": "a"},
            {"prompt": "Hi", "max_new_tokens": 2},
            "",  # blank lines are skipped, their numbers still count
            {"messages": [{"role": "user", "content": "Name three colours, please."}]},
            {"prompt": "Once upon a time, in a land far away, there lived", "temperature": 0.8, "seed": 7},
            {"prompt": "x", "top_k": 3, "temperature": 1.0, "seed": -1},
        ]),
        encoding="utf-8",
    )  # fmt: skip
    batched = _bulk(model_dir, path, capsys, "--temperature", "0", "--batch-size", "3")
    single = _bulk(model_dir, path, capsys, "--temperature", "0", "-b", "1")
    assert [r["index"] for r in batched] == [0, 1, 2, 3, 4] and [r["line"] for r in batched] == [1, 2, 4, 5, 6]
    assert batched[0]["id"] == "a" and "id" not in batched[1]
    assert batched[1]["generated_tokens"] <= 2 and batched[0]["sampling"]["temperature"] == 0
    assert batched[3]["sampling"]["temperature"] == 0.8 and batched[3]["sampling"]["seed"] == 7
    assert batched[4]["sampling"]["top_k"] == 3 and isinstance(batched[4]["sampling"]["seed"], int)
    for a, b in zip(batched[:4], single[:4], strict=True):  # the last one draws a random seed each run
        assert (a["tokens"], a["text"], a["finish_reason"]) == (b["tokens"], b["text"], b["finish_reason"])


def test_prompts_file_output_and_plain_text(model_dir, tmp_path, capsys):
    path = tmp_path / "prompts.txt"
    path.write_text("first prompt\n\nsecond, longer prompt here\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--prompts-file", str(path), "-m", str(model_dir), "--device", "cpu", "-n", "3"]
    assert run([*argv, "--temperature", "0", "--no-chat", "-b", "2", "--output", str(out)]) == 0
    assert capsys.readouterr().out == ""
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["line"] for r in rows] == [1, 3]
    argv_one = ["generate", "second, longer prompt here", "-m", str(model_dir), "--device", "cpu", "-n", "3"]
    assert run([*argv_one, "--temperature", "0", "--no-chat", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == rows[1]["tokens"]


def test_a_prompts_stop_string_cuts_it_as_generate_stop_does(model_dir, tmp_path, capsys):
    one = ["generate", "Tell me a story", "-m", str(model_dir), "--device", "cpu", "-n", "12", "--temperature", "0"]
    assert run([*one, "--json", "--ignore-eos"]) == 0
    text = json.loads(capsys.readouterr().out)["text"]
    stop = text[len(text) // 2 :][:2]
    assert run([*one, "--json", "--ignore-eos", "--stop", stop]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert alone["finish_reason"] == "stop"
    path = tmp_path / "prompts.jsonl"
    path.write_text(_lines([{"prompt": "Hi there"}, {"prompt": "Tell me a story", "stop": stop}]), encoding="utf-8")
    rows = _bulk(model_dir, path, capsys, "-n", "12", "--temperature", "0", "--ignore-eos", "-b", "2")
    keys = ("text", "tokens", "generated_tokens", "finish_reason")
    assert [rows[1][k] for k in keys] == [alone[k] for k in keys]
    assert rows[0]["finish_reason"] == "length"  # the other prompt keeps no stop string


BAD_LINES = [
    ('{"prompt": "ok"', "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"max_new_tokens": 4}', "exactly one of 'prompt'"),
    ('{"prompt": "a", "messages": []}', "exactly one of 'prompt'"),
    ('{"prompt": ""}', "'prompt' must be a non-empty string"),
    ('{"prompt": "a", "top_p": 1.5}', "top_p must be in (0, 1]"),
    ('{"prompt": "a", "temperature": "hot"}', "'temperature' must be a number"),
    ('{"prompt": "a", "top_k": true}', "'top_k' must be an integer"),
    ('{"prompt": "a", "max_new_tokens": 0}', "'max_new_tokens' must be an integer from 1"),
    ('{"prompt": "a", "temprature": 0}', "unknown key 'temprature'"),
    ('{"messages": [{"role": "user"}]}', "'messages' must be a non-empty list"),
    ('{"prompt": "a", "stop": [1]}', "'stop' must be a string or a list of strings"),
]


@pytest.mark.parametrize("bad, message", BAD_LINES)
def test_a_malformed_line_is_one_error_naming_it_and_nothing_runs(tmp_path, capsys, bad, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(_lines([{"prompt": "fine"}, "", bad, {"prompt": "also fine"}]), encoding="utf-8")
    # A model that does not exist: the file is refused before anything loads.
    argv = ["generate", "--prompts-file", str(path), "-m", str(tmp_path / "no-model"), "--device", "cpu"]
    assert run(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert captured.out == "" and len(err) == 1
    assert f"{path} line 3: " in err[0] and message in err[0]


def test_prompt_too_long_names_its_line_before_any_output(model_dir, tmp_path, capsys):
    path = tmp_path / "prompts.jsonl"
    path.write_text(_lines([{"prompt": "short"}, {"prompt": "word " * 200}]), encoding="utf-8")
    argv = ["generate", "--prompts-file", str(path), "-m", str(model_dir), "--device", "cpu", "--no-chat"]
    assert run([*argv, "-c", "64"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and f"{path} line 2: the prompt is" in captured.err


def test_a_run_that_fails_before_the_prompts_leaves_the_output_file_as_it_was(model_dir, tmp_path, capsys):
    """--output is checked before loading but replaced only once every prompt is ready: a missing model
    or a prompt too long for the context leaves an earlier file whole, and creates no empty one."""
    path = tmp_path / "prompts.jsonl"
    path.write_text(_lines([{"prompt": "short"}, {"prompt": "word " * 200}]), encoding="utf-8")
    earlier, absent = tmp_path / "answers.jsonl", tmp_path / "new.jsonl"
    earlier.write_text('{"earlier": "results"}\n', encoding="utf-8")
    for model in (tmp_path / "no-model", model_dir):
        for out in (earlier, absent):
            argv = ["generate", "--prompts-file", str(path), "-m", str(model), "--device", "cpu", "--no-chat"]
            assert run([*argv, "-c", "64", "--output", str(out)]) == 2
    capsys.readouterr()
    assert earlier.read_text(encoding="utf-8") == '{"earlier": "results"}\n' and not absent.exists()


@pytest.mark.parametrize(
    "extra, message",
    [(["hello"], "not both"), (["-b", "0"], "--batch-size must be at least 1")],
)
def test_prompts_file_flag_errors(tmp_path, capsys, extra, message):
    path = tmp_path / "prompts.txt"
    path.write_text("hi\n", encoding="utf-8")
    assert run(["generate", *extra, "--prompts-file", str(path), "-m", str(tmp_path / "none")]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_batched_chat_equals_one_by_one(smollm2_dir, tmp_path, capsys):
    prompts = ["What is the capital of France?", "Hi", "Write one sentence about the sea and the wind."]
    path = tmp_path / "prompts.jsonl"
    path.write_text(_lines({"prompt": p} for p in prompts), encoding="utf-8")
    # Float weights: the int4 kernels' rounding depends on how many rows a product has, so a quantized
    # model's logits already differ between prompts of other lengths, batched or not.
    flags = ["--device", "cpu", "--quant", "none", "-n", "12", "--temperature", "0"]
    assert run(["generate", "--prompts-file", str(path), *flags, "-b", "3"]) == 0
    batched = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for prompt, row in zip(prompts, batched, strict=True):
        assert run(["generate", prompt, *flags, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["text"] == row["text"]
