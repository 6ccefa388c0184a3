"""What a model holds in memory, computed from its shapes before anything is allocated.

Element counts and bytes (never traffic: that is ``llmrun.profiler.costs``). ``llmrun info``
shows the parameter counts and the KV cache; the preflight checks (``llmrun.devices.check_fits``)
compare the weights, a KV cache and a forward pass's activations with the memory free, so that a
run too large for the machine is refused with the numbers instead of reaching the OOM killer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmrun.model.config import ModelArgs
from llmrun.model.quant import QuantSpec

LOGITS_BYTES = 4  # the executor's logits are float32


@dataclass(frozen=True)
class ParameterCounts:
    """Element counts. ``non_embedding`` excludes the token embedding and an untied lm_head
    (Kaplan et al. 2020's N); ``total`` counts a tied matrix once."""

    total: int
    embedding: int
    lm_head: int
    non_embedding: int


def parameter_counts(args: ModelArgs) -> ParameterCounts:
    """The parameters of ``Transformer(args)``, by shape (tests check it against the modules themselves)."""
    d, f, hd = args.hidden_size, args.intermediate_size, args.head_dim
    h, k = args.num_attention_heads, args.num_key_value_heads
    qkv = (h + 2 * k) * hd
    attention = d * qkv + h * hd * d + (qkv if args.attention_bias else 0)
    attention += d if args.attention_bias and args.model_type == "llama" else 0  # o_proj's bias
    mlp = 3 * d * f + ((2 * f + d) if args.mlp_bias else 0)
    layers = args.num_hidden_layers * (attention + mlp + 2 * d)  # two RMSNorm scales per layer
    embedding = args.vocab_size * d
    lm_head = 0 if args.tie_word_embeddings else embedding
    non_embedding = layers + d  # the final norm
    return ParameterCounts(non_embedding + embedding + lm_head, embedding, lm_head, non_embedding)


def weight_bytes(args: ModelArgs, dtype: torch.dtype, quant: QuantSpec | None = None) -> int:
    """Bytes of every weight in ``dtype``, or with the matrices and embedding stored as ``quant`` (int8, int4)."""
    return int(parameter_counts(args).total * weight_width(args, dtype, quant))


def weight_width(args: ModelArgs, dtype: torch.dtype, quant: QuantSpec | None = None) -> float:
    """Bytes per weight element, from the shapes alone: ``dtype``'s size, or with ``quant`` int8 1 + 4/d
    (one float32 scale per row of d columns, the hidden size, as most matrices have) and int4:G
    0.5 + 8/G (a float32 scale and zero per G columns). The norms (float) are under 0.1% of a model."""
    if quant is None or quant.kind not in ("int8", "int4"):
        return float(dtype.itemsize)
    if quant.kind == "int8":
        return 1 + 4 / args.hidden_size
    return 0.5 + 8 / quant.group


def kv_cache_bytes(args: ModelArgs, batch: int, positions: int, dtype: torch.dtype) -> int:
    """Bytes of a KV cache for ``batch`` sequences of ``positions`` tokens: 2 · layers · kv heads · head dim each."""
    return 2 * args.num_hidden_layers * batch * positions * args.num_key_value_heads * args.head_dim * dtype.itemsize


def activation_bytes(
    args: ModelArgs, batch: int, tokens: int, keys: int, dtype: torch.dtype, *, all_logits: bool = False
) -> int:
    """Peak bytes of one layer's intermediates in a forward pass of ``tokens`` new tokens per sequence
    attending to ``keys`` positions, plus the float32 logits of the last position (of every position
    with ``all_logits``).

    Live at once at worst: the residual stream and a normed copy (B, T, d) twice, q/k/v and their
    rotated copies (B, T, (h + 2k)·hd) twice, the attention output (B, T, h·hd), gate/up (B, T, 2f)
    and SiLU·up (B, T, f), and one block of attention scores (B, h, min(T, 128), keys) in float32.
    An upper bound within a small factor, enough to refuse what cannot fit.
    """
    d, f, hd = args.hidden_size, args.intermediate_size, args.head_dim
    h, k = args.num_attention_heads, args.num_key_value_heads
    per_token = 2 * d + 2 * (h + 2 * k) * hd + h * hd + 3 * f
    scores = batch * h * min(tokens, 128) * keys * 4
    logits = batch * (tokens if all_logits else 1) * args.vocab_size * LOGITS_BYTES
    return batch * tokens * per_token * dtype.itemsize + scores + logits
