"""Perplexity's ways of cutting windows, checked against NLLs computed by hand from ``forward``'s logits.

llama-perplexity's scoring (``--llama-cpp``): windows of -c tokens, non-overlapping, BOS in place of
each window's first token, only the tokens after the first half scored; the ``±`` it prints is
ppl x the standard error of the mean NLL, sqrt((E[x²] - E[x]²) / (N - 1)).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from llmrun.cli.app import run
from llmrun.errors import LlmrunError
from llmrun.generation.perplexity import perplexity, sliding_windows
from llmrun.model.executor import forward

BOS = 1


@pytest.fixture(scope="module")
def model():
    from helpers import TINY

    from llmrun.model.config import ModelArgs
    from llmrun.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_dict({**TINY, "model_type": "llama"})).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model


@pytest.fixture(scope="module")
def ids():
    return torch.randint(2, 320, (45,), generator=torch.Generator().manual_seed(1)).tolist()


def _nll(model, window: list[int], offsets: range) -> list[float]:
    """-log p(window[j] | window[:j]) for j in offsets, in float64 from forward()'s logits."""
    logits = forward(model, torch.tensor([window]))[0].double()
    return [-(logits[j - 1].log_softmax(-1)[window[j]]).item() for j in offsets]


def _check(result, nlls: list[float], windows: int) -> None:
    n = len(nlls)
    mean = sum(nlls) / n
    stderr = torch.tensor(nlls, dtype=torch.float64).std(correction=1).item() / math.sqrt(n)  # = llama.cpp's formula
    assert (result.tokens, result.windows) == (n, windows)
    assert result.nll == pytest.approx(mean, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(mean), rel=1e-5)
    assert result.nll_stderr == pytest.approx(stderr, rel=1e-4)
    assert result.perplexity_stderr == pytest.approx(math.exp(mean) * stderr, rel=1e-4)


def test_llama_cpp_mode_scores_the_second_half_of_each_window_after_bos(model, ids):
    context = 10  # 45 tokens: 4 windows of 10 (the last 5 tokens are not used), first = 5
    nlls = []
    for k in range(4):
        window = [BOS, *ids[k * context + 1 : (k + 1) * context]]
        nlls += _nll(model, window, range(6, 10))  # positions first+1 .. context-1
    result = perplexity(model, ids, context, llama_cpp=True, bos=BOS)
    _check(result, nlls, 4)
    assert result.mode == "llama.cpp"
    no_bos = perplexity(model, ids, context, llama_cpp=True)  # a tokenizer that adds no BOS: the text as is
    hand = [x for k in range(4) for x in _nll(model, ids[k * context : (k + 1) * context], range(6, 10))]
    _check(no_bos, hand, 4)


def test_llama_cpp_stride_mode_scores_the_last_stride_tokens_of_each_window(model, ids):
    context, stride = 12, 5  # windows at 0, 5, ..., (45 - 12 + 4) // 5 = 7 of them
    nlls = [x for i in range(7) for x in _nll(model, ids[i * stride : i * stride + context], range(7, 12))]
    _check(perplexity(model, ids, context, llama_cpp=True, stride=stride, bos=BOS), nlls, 7)


def test_default_windows_score_every_token_after_each_window_start(model, ids):
    context = 16  # windows 0..15, 16..31, 32..44: each first token unscored
    nlls = [x for b in (0, 16, 32) for x in _nll(model, ids[b : b + context], range(1, len(ids[b : b + context])))]
    _check(perplexity(model, ids, context), nlls, 3)


def test_stride_scores_every_token_once_with_context_before_it(model, ids):
    context, stride = 16, 6
    plan = sliding_windows(len(ids), context, stride)
    scored = [t for w in plan for t in range(w.scored_from, w.end)]
    assert scored == list(range(1, len(ids)))  # each token after the first, once, in order
    nlls = []
    for w in plan:
        window = ids[w.begin : w.end]
        nlls += _nll(model, window, range(w.scored_from - w.begin, len(window)))
    result = perplexity(model, ids, context, stride=stride)
    _check(result, nlls, len(plan))
    assert result.stride == stride and result.tokens == len(ids) - 1


def test_running_estimate_is_reported_after_each_window(model, ids):
    seen: list[float] = []
    result = perplexity(model, ids, 16, seen.append)
    assert len(seen) == result.windows and seen[-1] == pytest.approx(result.perplexity)


@pytest.mark.parametrize(
    "how, message",
    [
        ({"llama_cpp": True, "context": 30}, "needs at least 2 x --context = 60"),
        ({"llama_cpp": True, "context": 10, "stride": 10}, "--stride must be between 1 and 9"),
        ({"context": 10, "stride": 11}, "--stride must be between 1 and 10"),
        ({"context": 10, "stride": 0}, "--stride must be between 1 and 10"),
    ],
)
def test_bad_modes_are_refused(model, ids, how, message):
    with pytest.raises(LlmrunError, match=message.replace("(", r"\(").replace(".", r"\.")):
        perplexity(model, ids, how.pop("context"), **how)


def test_cli_json_keeps_its_fields_and_adds_the_error_bar(tmp_path, capsys):
    from badinputs import build_model

    model_dir = build_model(tmp_path / "tiny")
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat and looked at the dog. " * 8, encoding="utf-8")
    base = ["perplexity", str(text), "-m", str(model_dir), "--device", "cpu", "-c", "32"]
    assert run([*base, "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert {"perplexity", "nll", "tokens", "windows", "context", "model", "dtype"} <= set(plain)
    assert plain["nll_stderr"] > 0 and plain["perplexity_stderr"] == pytest.approx(
        plain["perplexity"] * plain["nll_stderr"]
    )
    assert (plain["mode"], plain["stride"]) == ("default", 32)
    assert run([*base, "--llama-cpp", "--json"]) == 0
    llama = json.loads(capsys.readouterr().out)
    assert llama["mode"] == "llama.cpp" and llama["tokens"] == llama["windows"] * 15  # 32 - 16 - 1 per window
    assert run([*base, "--stride", "8"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("perplexity ") and " ± " in line and "nats/token" in line
    assert run([*base, "--stride", "0"]) == 2
    assert "--stride must be at least 1" in capsys.readouterr().err
