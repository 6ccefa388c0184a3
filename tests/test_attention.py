"""The CPU prefill attention that may stand in for SDPA (``llmrun.model.attention.blocked_attention``)
against exact references.

The reference is SDPA in float64 on the same inputs. bf16 carries 8 bits of mantissa (relative
rounding 2^-8 ≈ 3.9e-3), fp32 24 (2^-24): SDPA's own kernel lands within about that of the
reference on unit-variance inputs, and the blocked path rounds once more (the probabilities, to
the inputs' dtype, before the product with V, as transformers' eager attention does), so it must
stay within twice SDPA's error plus one rounding step. A wrong mask, window or head grouping moves
outputs by tenths to units.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llmrun.model.attention
from llmrun.loading.loader import load_model
from llmrun.model.executor import make_cache, prefill


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
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_blocked_attention_matches_float64_sdpa(monkeypatch, batch, heads, kv_heads, t, start, window, dtype):
    monkeypatch.setattr(llmrun.model.attention, "ATTENTION_BLOCK", 8)
    gen = torch.Generator().manual_seed(t + start)
    q = torch.randn(batch, heads, t, 16, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, start + t, 16, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, start + t, 16, generator=gen).to(dtype)
    got = llmrun.model.attention.blocked_attention(q, k, v, start, window=window)
    assert got.shape == q.shape and got.dtype == dtype
    exact = _sdpa(q.double(), k.double(), v.double(), start, window=window)
    sdpa_err = (_sdpa(q, k, v, start, window=window).double() - exact).abs().max()
    err = (got.double() - exact).abs().max()
    assert err <= 2 * sdpa_err + torch.finfo(dtype).eps / 2, (err, sdpa_err)


def _count_blocked(monkeypatch) -> list:
    """Calls of ``blocked_attention`` from now on (it still runs)."""
    calls = []
    real = llmrun.model.attention.blocked_attention
    monkeypatch.setattr(llmrun.model.attention, "blocked_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def test_prefill_takes_the_kernel_set_on_the_model_in_either_dtype(tiny_factory, monkeypatch):
    calls = _count_blocked(monkeypatch)
    path = tiny_factory("llama", num_key_value_heads=2)
    tokens = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(3))
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(path, torch.device("cpu"), dtype, progress=False)
        for kernel, runs in (("sdpa", 0), ("blocked", model.args.num_hidden_layers)):
            if kernel != "sdpa":  # SDPA is the default
                model.prefill_attention = kernel
            calls.clear()
            prefill(model, tokens, make_cache(model, 1, 16))
            assert len(calls) == runs, (dtype, kernel)


def test_padded_rows_and_decode_keep_sdpa_whatever_the_choice(monkeypatch):
    calls = _count_blocked(monkeypatch)
    q, k, v = (torch.randn(2, 4, 6, 16) for _ in "qkv")
    padded = llmrun.model.attention.attend(q, k, v, 0, None, padding=torch.tensor([0, 2]), kernel="blocked")
    decode = llmrun.model.attention.attend(q[:, :, :1], k[:, :, :1], v[:, :, :1], 0, None, kernel="blocked")
    assert calls == [] and padded.shape == q.shape and decode.shape == (2, 4, 1, 16)


@pytest.mark.slow
def test_smollm2_bf16_prefill_is_as_close_to_fp32_as_with_sdpa(smollm2_dir, smollm2_fp32):
    """Real weights, a 300-token prompt (3 blocks): logits no further from fp32 than bf16 SDPA's are."""
    model = load_model(smollm2_dir, torch.device("cpu"), torch.bfloat16, progress=False)
    model.prefill_attention = "blocked"
    tokens = torch.randint(0, model.args.vocab_size, (1, 300), generator=torch.Generator().manual_seed(4))

    def last_logits(m):
        return prefill(m, tokens, make_cache(m, 1, 300))

    reference = last_logits(smollm2_fp32)
    blocked_err = (last_logits(model) - reference).abs().max()
    model.prefill_attention = "sdpa"
    sdpa_err = (last_logits(model) - reference).abs().max()
    assert blocked_err <= 1.5 * sdpa_err, (blocked_err, sdpa_err)
