"""Causal attention over the KV cache: SDPA, and a blocked kernel that CPU prefill may take instead.

Which of the two prefills faster depends on the CPU, the dtype, the head shape and the PyTorch
build, so the choice is measured on the user's machine (``llmrun.profiler.attention_tuning``) and
set on the model (``Transformer.prefill_attention``); without a measurement prefill takes SDPA.
``LLMRUN_PREFILL_ATTENTION`` (``sdpa``, ``blocked`` or ``auto``) forces the choice.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from llmrun.errors import LlmrunError
from llmrun.model.kvcache import LayerCache

PREFILL_KERNELS = ("sdpa", "blocked")  # the attention kernels CPU prefill chooses between


def forced_prefill_attention() -> str | None:
    """The kernel ``LLMRUN_PREFILL_ATTENTION`` forces (``sdpa`` or ``blocked``), None when unset or ``auto``;
    any other value raises ``LlmrunError``."""
    choice = os.environ.get("LLMRUN_PREFILL_ATTENTION", "auto")
    if choice == "auto":
        return None
    if choice not in PREFILL_KERNELS:
        raise LlmrunError(f"LLMRUN_PREFILL_ATTENTION={choice!r} is not a kernel: set it to auto, sdpa or blocked")
    return choice


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: int,
    cache: LayerCache | None,
    *,
    window: int | None = None,
    padding: torch.Tensor | None = None,
    kernel: str = "sdpa",
) -> torch.Tensor:
    """Causal attention of q (B, H, T, D) over the cache's positions 0..start+T-1 (or k, v alone).

    The new k, v (B, Hkv, T, D) are written into the cache first. Query i attends to keys
    0..start+i; with a single query (decode) that is every cached key, so no mask is needed.
    With a sliding ``window`` w (Mistral), query i attends to keys i-w+1..i only, as in transformers'
    ``sliding_window_overlay``; the mask matters only once the sequence is longer than w.
    With ``padding`` (B,) int64, row b's keys 0..padding[b]-1 are left padding that no query sees
    (a padded query sees itself alone, so that its row of the softmax is not empty).
    ``kernel`` (one of ``PREFILL_KERNELS``) is what runs more than one query on the CPU without
    padding: ``blocked`` takes ``blocked_attention``; decode, padded rows and CUDA always take SDPA.
    """
    t = q.shape[2]
    if cache is not None:
        k, v = cache.update(start, k, v)
    elif start:
        raise ValueError("attention without a cache must start at position 0")
    gqa = q.shape[1] != k.shape[1]
    if window is not None and start + t <= window:
        window = None
    if padding is not None:
        mask = _causal_mask(start, t, window, q.device)[None] & _unpadded(padding, start, t, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=gqa)
    if t > 1 and kernel == "blocked" and q.device.type == "cpu":
        return blocked_attention(q, k, v, start, window=window)
    if window is None and (t == 1 or start == 0):
        return F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_mask(start, t, window, q.device), enable_gqa=gqa)


def _causal_mask(start: int, t: int, window: int | None, device: torch.device) -> torch.Tensor:
    """(T, start+T) bool: query start+i may see key j (j <= start+i, and within the window)."""
    keys = torch.arange(start + t, device=device)
    queries = torch.arange(start, start + t, device=device)
    mask = keys[None, :] <= queries[:, None]
    if window is not None:
        mask &= keys[None, :] > queries[:, None] - window
    return mask


def _unpadded(padding: torch.Tensor, start: int, t: int, device: torch.device) -> torch.Tensor:
    """(B, T, start+T) bool: key j is a real token of row b, or the query itself."""
    keys = torch.arange(start + t, device=device)
    queries = torch.arange(start, start + t, device=device)
    real = keys[None, :] >= padding.to(device)[:, None]  # (B, start+T)
    return real[:, None, :] | (keys[None, :] == queries[:, None])[None]


ATTENTION_BLOCK = 128  # query rows per block of ``blocked_attention``


def blocked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, *, window: int | None = None
) -> torch.Tensor:
    """Causal attention of q (B, H, T, D) at positions start.. over k, v (B, Hkv, start+T, D): (B, H, T, D).

    The alternative to SDPA for CPU prefill, where SDPA's flash kernel can run far below the GEMM's
    rate (docs/performance.md, "Prefill attention in bf16"): query rows go in blocks of
    ``ATTENTION_BLOCK``; each block is one batched matmul
    against the keys it can see (the G query heads of a K/V head stacked as G·rows, so K/V are not
    repeated), softmax in place, and one matmul with V. Masking touches only the block's diagonal square
    (and, with a sliding window, its left edge), and no key past the block is multiplied, so about
    half the square is skipped. The numerics are transformers' eager attention: scores accumulated
    in float32 and rounded to the inputs' dtype, softmax in float32, probabilities rounded to that
    dtype for the product with V. Memory: one block's scores, (B·H, rows, keys) in the inputs' dtype,
    reused by every block.
    """
    b, h, t, d = q.shape
    n_kv = k.shape[1]
    group = h // n_kv
    scale = 1 / math.sqrt(d)
    keys_t = k.reshape(b * n_kv, k.shape[2], d).transpose(1, 2)  # (B·Hkv, D, S)
    values = v.reshape(b * n_kv, v.shape[2], d)  # (B·Hkv, S, D)
    out = torch.empty(b, t, h, d, dtype=q.dtype, device=q.device)  # (B, T, H, D): o_proj reads it as is
    out_groups = out.transpose(1, 2).view(b, n_kv, group, t, d)
    q_groups = q.reshape(b, n_kv, group, t, d)
    block = min(t, ATTENTION_BLOCK)
    # One scores buffer for every block (softmax runs in place in it); True above the diagonal.
    scratch = torch.empty(b * h * block * (start + t), dtype=q.dtype, device=q.device)
    future = torch.ones(block, block, dtype=torch.bool, device=q.device).triu(1)
    for i0 in range(0, t, block):
        i1 = min(t, i0 + block)
        rows = i1 - i0
        first, last = start + i0, start + i1  # positions of the block's queries: first..last-1
        lo = 0 if window is None else max(0, first - window + 1)  # the first key any of them sees
        flat = scratch[: b * h * rows * (last - lo)].view(b * n_kv, group * rows, last - lo)
        block_q = q_groups[:, :, :, i0:i1].reshape(b * n_kv, group * rows, d)
        torch.baddbmm(flat, block_q, keys_t[:, :, lo:last], beta=0, alpha=scale, out=flat)  # q k^T / sqrt(D)
        scores = flat.view(b * n_kv, group, rows, last - lo)
        if window is None:  # keys before the block are visible to all of its queries: mask the diagonal square
            scores[..., first - lo :].masked_fill_(future[:rows, :rows], float("-inf"))
        else:
            positions = torch.arange(first, last, device=q.device)[:, None]  # (rows, 1)
            keys = torch.arange(lo, last, device=q.device)[None, :]
            scores.masked_fill_((keys > positions) | (keys <= positions - window), float("-inf"))
        torch._softmax(flat, -1, False, out=flat)  # in place, computed in float32, rounded to the dtype
        block_out = torch.bmm(flat, values[:, lo:last])  # (B·Hkv, G·rows, D)
        out_groups[:, :, :, i0:i1] = block_out.view(b, n_kv, group, rows, d)
    return out.transpose(1, 2)
