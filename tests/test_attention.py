"""The CPU bf16 prefill attention (``llmrun.model.attention.blocked_attention``) against exact references.

The reference is SDPA in float64 on the same bf16 inputs. bf16 carries 8 bits of mantissa
(relative rounding 2^-8 ≈ 3.9e-3): SDPA's own bf16 kernel lands within about that of the
reference on unit-variance inputs, and the blocked path rounds once more (the probabilities, to
bf16, before the product with V, as transformers' eager attention does), so it must stay within
twice SDPA's error plus one rounding step. A wrong mask, window or head grouping moves outputs
by tenths to units.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llmrun.model.attention
from llmrun.loading.loader import load_model
from llmrun.model.executor import make_cache, prefill

BF16_STEP = 2.0**-8


def _mask(t: int, start: int, window: int | None) -> torch.Tensor:
    """(T, start+T) True where query start+i may see key j."""
    keys, queries = torch.arange(start + t)[None, :], torch.arange(start, start + t)[:, None]
    mask = keys <= queries
    if window is not None:
        mask &= keys > queries - window
    return mask


def _sdpa(q, k, v, start, *, window=None, dtype=None):
    """SDPA with an explicit mask and repeated K/V heads, in ``dtype`` (default: the inputs')."""
    group = q.shape[1] // k.shape[1]
    dtype = dtype or q.dtype
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    mask = _mask(q.shape[2], start, window)
    return F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=mask).to(q.dtype)


@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "t", "start", "window"),
    [
        (1, 9, 3, 40, 0, None),  # SmolLM2's grouping, 5 blocks
        (2, 4, 2, 20, 7, None),  # batch, a prompt continuing a cache
        (1, 4, 4, 30, 5, 6),  # MHA with a sliding window
        (2, 6, 2, 17, 0, 5),  # GQA, window, a last block of 1 row
        (1, 2, 1, 3, 10, None),  # fewer rows than a block
    ],
)
def test_blocked_attention_matches_float64_sdpa(monkeypatch, batch, heads, kv_heads, t, start, window):
    monkeypatch.setattr(llmrun.model.attention, "ATTENTION_BLOCK", 8)
    gen = torch.Generator().manual_seed(t + start)
    q = torch.randn(batch, heads, t, 16, generator=gen).bfloat16()
    k = torch.randn(batch, kv_heads, start + t, 16, generator=gen).bfloat16()
    v = torch.randn(batch, kv_heads, start + t, 16, generator=gen).bfloat16()
    got = llmrun.model.attention.blocked_attention(q, k, v, start, window=window)
    assert got.shape == q.shape and got.dtype == torch.bfloat16
    exact = _sdpa(q.double(), k.double(), v.double(), start, window=window)
    sdpa_err = (_sdpa(q, k, v, start, window=window).double() - exact).abs().max()
    err = (got.double() - exact).abs().max()
    assert err <= 2 * sdpa_err + BF16_STEP, (err, sdpa_err)


def test_bf16_prefill_takes_the_blocked_path_and_fp32_does_not(tiny_factory, monkeypatch):
    calls = []
    real = llmrun.model.attention.blocked_attention
    monkeypatch.setattr(llmrun.model.attention, "blocked_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    path = tiny_factory("llama", num_key_value_heads=2)
    tokens = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(3))
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(path, torch.device("cpu"), dtype, progress=False)
        prefill(model, tokens, make_cache(model, 1, 16))
        assert len(calls) == (0 if dtype == torch.float32 else model.args.num_hidden_layers)


@pytest.mark.slow
def test_smollm2_bf16_prefill_is_as_close_to_fp32_as_with_sdpa(smollm2_dir, smollm2_fp32, monkeypatch):
    """Real weights, a 300-token prompt (3 blocks): logits no further from fp32 than bf16 SDPA's are."""
    model = load_model(smollm2_dir, torch.device("cpu"), torch.bfloat16, progress=False)
    tokens = torch.randint(0, model.args.vocab_size, (1, 300), generator=torch.Generator().manual_seed(4))

    def last_logits(m):
        return prefill(m, tokens, make_cache(m, 1, 300))

    reference = last_logits(smollm2_fp32)
    blocked_err = (last_logits(model) - reference).abs().max()
    monkeypatch.setattr(llmrun.model.attention, "blocked_attention", _sdpa)
    sdpa_err = (last_logits(model) - reference).abs().max()
    assert blocked_err <= 1.5 * sdpa_err, (blocked_err, sdpa_err)
