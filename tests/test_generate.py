"""Generation on the real default model against transformers' greedy output, and the text layer."""

from __future__ import annotations

import pytest
import torch

from llmrun.generation.generate import GenerationStats, generate_tokens, stream_text
from llmrun.generation.sampling import Sampler, SamplingParams
from llmrun.generation.tokenizer import Tokenizer

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Explain photosynthesis to a ten-year-old.",
    "List three colours of the rainbow.",
]
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return Tokenizer.from_dir(smollm2_dir)


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_32_tokens_equal_transformers(smollm2_fp32, smollm2_hf, tokenizer, prompt):
    ids = tokenizer.encode_chat([{"role": "user", "content": prompt}])
    stats = GenerationStats()
    ours = list(generate_tokens(smollm2_fp32, ids, Sampler(GREEDY), max_new_tokens=32, stats=stats))
    with torch.inference_mode():
        ref = smollm2_hf.generate(
            torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(ids) :].tolist()
    assert ours == ref
    assert stats.generated_tokens == 32 and stats.finish_reason == "length"


@pytest.mark.slow
def test_greedy_answer_stops_at_eos_and_names_paris(smollm2_fp32, tokenizer):
    ids = tokenizer.encode_chat([{"role": "user", "content": PROMPTS[0]}])
    stats = GenerationStats()
    tokens = generate_tokens(
        smollm2_fp32, ids, Sampler(GREEDY), max_new_tokens=64, stop_ids=tokenizer.eos_ids, stats=stats
    )
    text = "".join(stream_text(tokens, tokenizer.stream_decoder()))
    assert "Paris" in text
    assert stats.finish_reason == "stop" and stats.generated_tokens < 64
    assert stats.ttft_s > 0 and stats.prefill_tok_s > 0


@pytest.mark.slow
def test_same_seed_same_output(smollm2_fp32, tokenizer):
    ids = tokenizer.encode("Once upon a time")
    params = SamplingParams(temperature=1.0, seed=1234)
    runs = [list(generate_tokens(smollm2_fp32, ids, Sampler(params), max_new_tokens=16)) for _ in range(2)]
    other = list(
        generate_tokens(smollm2_fp32, ids, Sampler(SamplingParams(temperature=1.0, seed=5)), max_new_tokens=16)
    )
    assert runs[0] == runs[1]
    assert other != runs[0]


class FakeDecoder:
    """Each token id is one character; enough to test stop strings independently of a vocabulary."""

    def push(self, token_id: int) -> str:
        return chr(token_id)

    def flush(self) -> str:
        return ""


def _chars(text: str):
    yield from map(ord, text)


def test_stop_string_cuts_text_and_sets_finish_reason():
    stats = GenerationStats()
    out = "".join(stream_text(_chars("hello world, STOP here"), FakeDecoder(), ["STOP"], stats))
    assert out == "hello world, "
    assert stats.finish_reason == "stop"


def test_text_that_only_starts_like_a_stop_string_is_released():
    chunks = list(stream_text(_chars("abc ST then more"), FakeDecoder(), ["STOP"]))
    assert "".join(chunks) == "abc ST then more"


def test_stop_string_split_across_tokens_is_found():
    out = "".join(stream_text(iter([ord(c) for c in "x</s"] + [ord(">"), ord("y")]), FakeDecoder(), ["</s>"]))
    assert out == "x"


def test_context_end_sets_finish_reason_context(tiny_factory):
    from llmrun.loading.loader import load_model

    model = load_model(tiny_factory("llama", max_position_embeddings=16), torch.device("cpu"), torch.float32)
    stats = GenerationStats()
    out = list(generate_tokens(model, [1, 2, 3, 4, 5], Sampler(GREEDY), max_new_tokens=100, stats=stats))
    assert len(out) == 16 - 5  # prompt + output fill the context exactly
    assert stats.finish_reason == "context"
