"""The Llama-family decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Follows Meta's llama3 ``model.py`` and Hugging Face's ``modeling_llama.py`` (the reference the
tests compare against), with module attributes named like the checkpoint keys
(``model.layers.0.self_attn.q_proj``) so that loading is a direct mapping. Qwen2 (bias on q/k/v)
and Mistral are the same graph with other constants.

The layer loop lives in ``llmrun.model.executor``; a ``Block`` computes one layer and marks each named
op on the probe it is given (see ``llmrun.model.probe``). Nothing here times anything.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmrun.errors import LlmrunError
from llmrun.model.config import ROPE_TYPES, ModelArgs
from llmrun.model.kvcache import LayerCache
from llmrun.model.probe import Probe


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and cast back (as Hugging Face does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(args: ModelArgs, seq_len: int | None = None) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) float32, with ``rope_scaling`` applied (llama3, linear, dynamic).

    Dynamic NTK scaling depends on ``seq_len``, the length of the sequence so far (positions
    0..seq_len-1): past ``max_position_embeddings`` the base grows as in transformers'
    ``_compute_dynamic_ntk_parameters``; up to it (or with ``seq_len`` None) it is plain RoPE.
    """
    dim = args.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim
    scaling = args.rope_scaling or {}
    kind = args.rope_type
    base = args.rope_theta
    if kind == "dynamic" and seq_len is not None and seq_len > args.max_position_embeddings:
        factor = float(scaling["factor"])
        base = base * (factor * seq_len / args.max_position_embeddings - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base**exponents)
    if kind in ("default", "dynamic"):
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise LlmrunError(f"config.json: rope_scaling type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1's frequency-dependent RoPE scaling (Meta's ``apply_scaling``)."""
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(is_medium, smoothed, scaled)


class Rotary:
    """Rotate-half RoPE. ``inv_freq`` stays float32 on the CPU whatever the model's dtype."""

    def __init__(self, args: ModelArgs) -> None:
        self.args = args
        self.inv_freq = rope_inv_freq(args)
        self._on_device: dict[torch.device, torch.Tensor] = {}

    def angles(self, start: int, t: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (T, head_dim) for positions start..start+T-1, in ``dtype``.

        With dynamic RoPE past ``max_position_embeddings`` the frequencies follow the sequence length
        start+T, as transformers recomputes them each forward (keys already cached keep their angles).
        """
        if self.args.rope_type == "dynamic" and start + t > self.args.max_position_embeddings:
            inv_freq = rope_inv_freq(self.args, start + t).to(device)
        else:
            inv_freq = self._on_device.get(device)
            if inv_freq is None:
                inv_freq = self._on_device.setdefault(device, self.inv_freq.to(device))
        positions = torch.arange(start, start + t, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, H, T, D) and k (B, Hkv, T, D) by angles cos/sin (T, D)."""
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    """Grouped-query self-attention projections (q, k, v, o)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        d, hd = args.hidden_size, args.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, hd
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=args.attention_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=args.attention_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=args.attention_bias)
        o_bias = args.attention_bias and args.model_type == "llama"
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=o_bias)
        self.split_sizes = (self.n_heads * hd, self.n_kv_heads * hd, self.n_kv_heads * hd)
        self.window: int | None = None  # sliding attention window in tokens (set by Block), None for full
        # Set by ``fuse_projections``: one (h+2k)·hd × d matrix whose row blocks are q_proj, k_proj and
        # v_proj's weights (those parameters become views of it). Plain attributes, not parameters,
        # so that ``parameters()`` still counts every weight once.
        self.wqkv: torch.Tensor | None = None
        self.bqkv: torch.Tensor | None = None


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        d, f = args.hidden_size, args.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=args.mlp_bias)
        self.up_proj = nn.Linear(d, f, bias=args.mlp_bias)
        self.down_proj = nn.Linear(f, d, bias=args.mlp_bias)
        # Set by ``fuse_projections``: gate_proj and up_proj's weights stacked into one 2f × d matrix.
        self.wgate_up: torch.Tensor | None = None
        self.bgate_up: torch.Tensor | None = None


class Block(nn.Module):
    """One decoder layer: pre-norm attention and pre-norm MLP, each with a residual."""

    def __init__(self, args: ModelArgs, index: int) -> None:
        super().__init__()
        self.index = index
        self.self_attn = Attention(args)
        self.self_attn.window = args.attention_windows()[index]
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        start: int,
        cache: LayerCache | None,
        probe: Probe,
    ) -> torch.Tensor:
        """x (B, T, d) at positions start..start+T-1 -> (B, T, d); writes K/V into ``cache``.

        ``rope`` is the (cos, sin) pair from ``Rotary.angles`` for those positions.
        """
        i, attn, mlp = self.index, self.self_attn, self.mlp
        b, t, _ = x.shape
        with probe.region("attn_norm", i):
            h = self.input_layernorm(x)
        with probe.region("qkv_proj", i):
            if attn.wqkv is not None:
                q, k, v = F.linear(h, attn.wqkv, attn.bqkv).split(attn.split_sizes, dim=-1)
            else:
                q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
            q = q.view(b, t, attn.n_heads, attn.head_dim).transpose(1, 2)  # (B, H, T, D)
            k = k.view(b, t, attn.n_kv_heads, attn.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
            v = v.view(b, t, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
        with probe.region("rope", i):
            q, k = apply_rope(q, k, *rope)
        with probe.region("attention", i):
            o = attend(q, k, v, start, cache, window=attn.window)  # (B, H, T, D)
        with probe.region("o_proj", i):
            o = attn.o_proj(o.transpose(1, 2).reshape(b, t, attn.n_heads * attn.head_dim))
        with probe.region("attn_residual", i):
            x = x + o
        with probe.region("mlp_norm", i):
            h = self.post_attention_layernorm(x)
        with probe.region("gate_up_proj", i):
            if mlp.wgate_up is not None:
                gate, up = F.linear(h, mlp.wgate_up, mlp.bgate_up).chunk(2, dim=-1)  # (B, T, f) each
            else:
                gate, up = mlp.gate_proj(h), mlp.up_proj(h)
        with probe.region("act", i):
            h = F.silu(gate) * up
        with probe.region("down_proj", i):
            h = mlp.down_proj(h)
        with probe.region("mlp_residual", i):
            return x + h


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: int,
    cache: LayerCache | None,
    *,
    window: int | None = None,
) -> torch.Tensor:
    """Causal attention of q (B, H, T, D) over the cache's positions 0..start+T-1 (or k, v alone).

    The new k, v (B, Hkv, T, D) are written into the cache first. Query i attends to keys
    0..start+i; with a single query (decode) that is every cached key, so no mask is needed.
    With a sliding ``window`` w (Mistral), query i attends to keys i-w+1..i only, as in transformers'
    ``sliding_window_overlay``; the mask matters only once the sequence is longer than w.
    """
    t = q.shape[2]
    if cache is not None:
        k, v = cache.update(start, k, v)
    elif start:
        raise ValueError("attention without a cache must start at position 0")
    gqa = q.shape[1] != k.shape[1]
    if window is not None and start + t <= window:
        window = None
    if t > 1 and q.dtype == torch.bfloat16 and q.device.type == "cpu":
        return blocked_attention(q, k, v, start, window=window)
    if window is None and (t == 1 or start == 0):
        return F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=gqa)
    keys = torch.arange(start + t, device=q.device)
    queries = torch.arange(start, start + t, device=q.device)
    mask = keys[None, :] <= queries[:, None]  # (T, start+T)
    if window is not None:
        mask &= keys[None, :] > queries[:, None] - window
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


ATTENTION_BLOCK = 128  # query rows per block of ``blocked_attention``


def blocked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, *, window: int | None = None
) -> torch.Tensor:
    """Causal attention of q (B, H, T, D) at positions start.. over k, v (B, Hkv, start+T, D): (B, H, T, D).

    The CPU prefill path in bf16, where SDPA's flash kernel reaches ~70 GFLOP/s against ~400 for a
    bf16 GEMM: query rows go in blocks of ``ATTENTION_BLOCK``; each block is one batched matmul
    against the keys it can see (the G query heads of a K/V head stacked as G·rows, so K/V are not
    repeated), softmax in place, and one matmul with V. Masking touches only the block's diagonal square
    (and, with a sliding window, its left edge), and no key past the block is multiplied, so about
    half the square is skipped. The numerics are transformers' eager attention: scores accumulated
    in float32 and rounded to bf16, softmax in float32, probabilities rounded to bf16 for the
    product with V. Memory: one block's scores, (B·H, rows, keys) in bf16, reused by every block.
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
        torch._softmax(flat, -1, False, out=flat)  # in place, computed in float32, rounded to bf16
        block_out = torch.bmm(flat, values[:, lo:last])  # (B·Hkv, G·rows, D)
        out_groups[:, :, :, i0:i1] = block_out.view(b, n_kv, group, rows, d)
    return out.transpose(1, 2)


class Decoder(nn.Module):
    """Embedding, blocks and final norm: the checkpoint's ``model.*`` tensors."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        # An explicit (uninitialised) weight skips Embedding's normal_ init, which on the meta device imports
        # torch._dynamo: about 2 s more at start-up and 0.7 s more at exit. Checkpoints overwrite it anyway.
        empty = torch.empty(args.vocab_size, args.hidden_size)
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size, _weight=empty)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Transformer(nn.Module):
    """Decoder plus lm_head; ``lm_head.weight`` is the embedding when embeddings are tied."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model = Decoder(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rotary = Rotary(args)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def expected_tensors(self) -> dict[str, torch.Size]:
        """Checkpoint names and shapes this model needs (a tied lm_head is not stored)."""
        shapes = {name: p.shape for name, p in self.named_parameters(remove_duplicate=False)}
        if self.args.tie_word_embeddings:
            shapes.pop("lm_head.weight")
        return shapes


# Per block: the submodule, the fused weight and bias attribute names, and the projections fused, in row order.
FUSED_PROJECTIONS = (
    ("self_attn", "wqkv", "bqkv", ("q_proj", "k_proj", "v_proj")),
    ("mlp", "wgate_up", "bgate_up", ("gate_proj", "up_proj")),
)


def fuse_projections(
    model: Transformer, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Give every block one matrix for q/k/v (``wqkv``) and one for gate/up (``wgate_up``), in place.

    One matrix-vector product over a fused matrix costs one kernel launch instead of three (or two),
    which is most of what decode at batch 1 spends beyond reading the weights. The per-projection
    parameters (``q_proj.weight``, ...) become row-block views of the fused matrix: their names,
    shapes and values are unchanged and nothing is stored twice. Values already present are copied
    in; a model built on the meta device gets uninitialised storage on ``device`` in ``dtype``, for
    the loader to fill through the returned views. Blocks already fused are left alone.

    Returns checkpoint name -> view (``model.layers.0.self_attn.q_proj.weight``, ...) of every
    parameter that now lives inside a fused matrix.
    """
    views: dict[str, torch.Tensor] = {}
    for i, block in enumerate(model.model.layers):
        for owner_name, weight_attr, bias_attr, parts in FUSED_PROJECTIONS:
            owner = getattr(block, owner_name)
            if getattr(owner, weight_attr) is not None:
                continue
            linears = [getattr(owner, name) for name in parts]
            ref = linears[0].weight
            target = {
                "device": device or ref.device,
                "dtype": dtype or ref.dtype,
            }
            rows = sum(lin.out_features for lin in linears)
            weight = torch.empty(rows, linears[0].in_features, **target)
            bias = torch.empty(rows, **target) if linears[0].bias is not None else None
            row = 0
            for name, lin in zip(parts, linears, strict=True):
                prefix = f"model.layers.{i}.{owner_name}.{name}"
                span = slice(row, row + lin.out_features)
                views[f"{prefix}.weight"] = _adopt(lin, "weight", weight[span])
                if bias is not None:
                    views[f"{prefix}.bias"] = _adopt(lin, "bias", bias[span])
                row += lin.out_features
            setattr(owner, weight_attr, weight)
            setattr(owner, bias_attr, bias)
    return views


def _adopt(module: nn.Module, name: str, view: torch.Tensor) -> torch.Tensor:
    """Copy ``module.name`` into ``view`` (unless it is on the meta device) and make the parameter that view."""
    old = getattr(module, name)
    if not old.is_meta:
        view.copy_(old)
    setattr(module, name, nn.Parameter(view, requires_grad=False))
    return view
