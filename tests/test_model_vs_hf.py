"""llmrun's logits against Hugging Face transformers on the same weights (fp32, CPU).

Tolerance 1e-3 absolute on logits: both compute in fp32 with the same op order up to kernel
choices, so differences are accumulated rounding (observed ~1e-5 on SmolLM2); a real bug (a
wrong RoPE, mask or head grouping) moves logits by whole units.
"""

from __future__ import annotations

import pytest
import torch

from llmrun.loading.loader import load_model
from llmrun.model.executor import decode_step, forward, make_cache, prefill

ATOL = 1e-3


def _hf(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _prefill_then_decode(model, tokens: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """Logits (B, T - n_prompt + 1, V) for positions n_prompt-1 .. T-1, via prefill then decode steps."""
    cache = make_cache(model, tokens.shape[0], tokens.shape[1])
    out = [prefill(model, tokens[:, :n_prompt], cache)]
    for pos in range(n_prompt, tokens.shape[1]):
        out.append(decode_step(model, tokens[:, pos], cache))
    return torch.stack(out, dim=1)


@pytest.mark.slow
def test_smollm2_prefill_and_decode_match_transformers(smollm2_fp32, smollm2_hf):
    torch.manual_seed(0)
    tokens = torch.randint(0, smollm2_fp32.args.vocab_size, (1, 64 + 16))
    with torch.inference_mode():
        ref = smollm2_hf(tokens).logits  # (1, 80, V)
    got = _prefill_then_decode(smollm2_fp32, tokens, 64)  # prefill of 64, then 16 decode steps
    assert got.shape == (1, 17, smollm2_fp32.args.vocab_size)
    torch.testing.assert_close(got, ref[:, 63:], atol=ATOL, rtol=0)
    torch.testing.assert_close(forward(smollm2_fp32, tokens), ref, atol=ATOL, rtol=0)


TINY_CASES = {
    "gqa-tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "gqa-untied": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "mha-untied": dict(num_key_value_heads=4, tie_word_embeddings=False),
}


@pytest.mark.parametrize("case", TINY_CASES)
def test_tiny_llama_matches_transformers(tiny_factory, case):
    path = tiny_factory("llama", **TINY_CASES[case])
    ours = load_model(path, torch.device("cpu"), torch.float32, progress=False)
    tokens = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = _hf(path)(tokens).logits
    torch.testing.assert_close(forward(ours, tokens), ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(_prefill_then_decode(ours, tokens, 8), ref[:, 7:], atol=ATOL, rtol=0)


def test_cached_decode_equals_uncached_forward(tiny_factory):
    model = load_model(tiny_factory("llama", num_key_value_heads=2), torch.device("cpu"), torch.float32, progress=False)
    tokens = torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(2))
    uncached = forward(model, tokens)
    torch.testing.assert_close(_prefill_then_decode(model, tokens, 5), uncached[:, 4:], atol=1e-5, rtol=0)


def test_chunked_prefill_equals_one_prefill(tiny_factory):
    model = load_model(tiny_factory("llama", num_key_value_heads=2), torch.device("cpu"), torch.float32, progress=False)
    tokens = torch.randint(0, 320, (1, 30), generator=torch.Generator().manual_seed(3))
    cache = make_cache(model, 1, 30)
    prefill(model, tokens[:, :11], cache)
    rest = forward(model, tokens[:, 11:], cache)
    torch.testing.assert_close(rest, forward(model, tokens)[:, 11:], atol=1e-5, rtol=0)


def test_batch_of_two_equals_two_single_runs(tiny_factory):
    model = load_model(tiny_factory("llama", num_key_value_heads=2), torch.device("cpu"), torch.float32, progress=False)
    tokens = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(4))
    both = _prefill_then_decode(model, tokens, 6)
    for row in range(2):
        single = _prefill_then_decode(model, tokens[row : row + 1], 6)
        torch.testing.assert_close(both[row : row + 1], single, atol=1e-5, rtol=0)


def test_cache_fill_trim_and_reset(tiny_factory):
    """The cache's ``length`` places new tokens: trimming back to a shared prefix and going on equals
    a fresh run, a reset cache equals a new one, and tokens past the capacity are refused."""
    model = load_model(tiny_factory("llama", num_key_value_heads=2), torch.device("cpu"), torch.float32, progress=False)
    tokens = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(5))
    other = torch.randint(0, 320, (1, 6), generator=torch.Generator().manual_seed(6))
    cache = make_cache(model, 1, 16)
    prefill(model, tokens[:, :10], cache)
    assert (cache.length, cache.free) == (10, 6)
    cache.trim(4)  # keep the first 4 positions, continue with other tokens
    assert cache.length == 4
    continued = prefill(model, other, cache)
    expected = forward(model, torch.cat([tokens[:, :4], other], dim=1))[:, -1]
    torch.testing.assert_close(continued, expected, atol=1e-5, rtol=0)
    cache.reset()
    torch.testing.assert_close(prefill(model, tokens, cache), forward(model, tokens)[:, -1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="do not fit"):
        decode_step(model, tokens[:, 0], cache, fast=False)
    assert cache.length == 16  # a refused step changes nothing
