"""What a model holds in memory, computed from its shapes before anything is allocated.

Element counts and bytes, and each weight matrix's bytes per element in the form its kernel holds
(``matrix_widths``: what ``llmrun.profiler.costs`` charges per product; traffic is counted there). ``llmrun info``
shows the parameter counts and the KV cache; the preflight checks (``llmrun.devices.check_fits``)
compare the weights, a KV cache and a forward pass's activations with the memory free, so that a
run too large for the machine is refused with the numbers instead of reaching the OOM killer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from llmrun.model.config import ModelArgs
from llmrun.model.fused import BLOCK_LINEAR_OPS
from llmrun.model.quant import QuantSpec, predicted_read_bytes

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


EMBEDDING, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
# each linear op of a block: the checkpoint projections it multiplies by, fused in this order
BLOCK_MATRICES = {op: tuple(f"{sub}.{p}" for p in parts) for op, (sub, parts) in BLOCK_LINEAR_OPS.items()}


def matrix_shapes(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """(N, K) of every weight matrix by checkpoint name (``model.layers.0.self_attn.q_proj.weight``, ...,
    the embedding, and the lm_head unless it is tied)."""
    d, f, hd = args.hidden_size, args.intermediate_size, args.head_dim
    h, k = args.num_attention_heads, args.num_key_value_heads
    block = {
        "self_attn.q_proj": (h * hd, d),
        "self_attn.k_proj": (k * hd, d),
        "self_attn.v_proj": (k * hd, d),
        "self_attn.o_proj": (d, h * hd),
        "mlp.gate_proj": (f, d),
        "mlp.up_proj": (f, d),
        "mlp.down_proj": (d, f),
    }
    shapes = {f"model.layers.{i}.{p}.weight": s for i in range(args.num_hidden_layers) for p, s in block.items()}
    shapes[EMBEDDING] = (args.vocab_size, d)
    if not args.tie_word_embeddings:
        shapes[LM_HEAD] = (args.vocab_size, d)
    return shapes


def quant_formats(args: ModelArgs, quant: QuantSpec | None) -> dict[str, str]:
    """Checkpoint name -> format (``QuantWeight.format``) of every matrix that ``--quant`` int8 or int4:G
    stores quantized (one whose K the format cannot take stays float and is left out); {} otherwise."""
    if quant is None or quant.kind not in ("int8", "int4"):
        return {}
    return {name: quant.name for name, (_, k) in matrix_shapes(args).items() if quant.takes(k)}


def matrix_widths(
    args: ModelArgs, dtype: torch.dtype, formats: Mapping[str, str] | None = None, device_type: str = "cpu"
) -> dict[tuple[str, int | None], float]:
    """Bytes per weight element each linear op reads per product, by (op, layer) (lm_head: layer None), and
    ``embed`` per looked-up row, for matrices stored as ``formats`` (checkpoint name -> format; absent: float).

    Float: ``dtype``'s size. Quantized: the form of the kernel a weight gets without a measured choice on
    a ``device_type`` device (``quant.predicted_read_bytes``): the codes and the scales (and zeros) in the
    dtype that kernel holds them in (the model's on the CPU, bf16 for CUDA's int4). Projections fused
    into one matrix (q/k/v, gate/up) count as one where they share a format. The embedding's rows are
    read as stored: codes and float32 scales (and zeros).
    """
    formats = formats or {}
    shapes = matrix_shapes(args)
    widths: dict[tuple[str, int | None], float] = {}
    for i in range(args.num_hidden_layers):
        for op, parts in BLOCK_MATRICES.items():
            names = [f"model.layers.{i}.{part}.weight" for part in parts]
            fused = (sum(shapes[n][0] for n in names), shapes[names[0]][1])
            if len({formats.get(n) for n in names}) == 1:
                matrices = [(formats.get(names[0]), fused)]
            else:
                matrices = [(formats.get(n), shapes[n]) for n in names]
            read = sum(_matrix_bytes(fmt, n, k, dtype, device_type)[0] for fmt, (n, k) in matrices)
            widths[(op, i)] = read / (fused[0] * fused[1])
    v, d = shapes[EMBEDDING]
    widths[("embed", None)] = _matrix_bytes(formats.get(EMBEDDING), v, d, dtype, device_type)[1] / (v * d)
    head = formats.get(EMBEDDING if args.tie_word_embeddings else LM_HEAD)
    widths[("lm_head", None)] = _matrix_bytes(head, v, d, dtype, device_type)[0] / (v * d)
    return widths


def weight_bytes(
    args: ModelArgs, dtype: torch.dtype, formats: Mapping[str, str] | None = None, device_type: str = "cpu"
) -> int:
    """Bytes of every weight in ``dtype``, or held with the matrices stored as ``formats`` (``matrix_widths``).

    Quantized: each matrix in its kernel's form, the embedding in its stored form (a tied one as well
    as the lm_head's form, less its codes where they are 8-bit: the lm_head's kernel then multiplies
    by them or serves the lookups from its own), and the norms and biases in ``dtype``.
    """
    counts = parameter_counts(args)
    if not formats:
        return counts.total * dtype.itemsize
    widths, shapes = matrix_widths(args, dtype, formats, device_type), matrix_shapes(args)
    held = 0.0
    for (op, layer), width in widths.items():
        names = [f"model.layers.{layer}.{part}.weight" for part in BLOCK_MATRICES.get(op, ())]
        held += width * (sum(shapes[n][0] * shapes[n][1] for n in names) if names else counts.embedding)
    embed = formats.get(EMBEDDING)
    if args.tie_word_embeddings and embed is None:
        held -= counts.embedding * dtype.itemsize  # one float matrix, counted as both
    elif args.tie_word_embeddings and embed.startswith("int8"):
        held -= counts.embedding
    rest = counts.total - sum(n * k for n, k in shapes.values())  # the norms and biases
    return int(held + rest * dtype.itemsize)


def _matrix_bytes(fmt: str | None, n: int, k: int, dtype: torch.dtype, device_type: str) -> tuple[int, int]:
    """(bytes one product reads, bytes stored) of an (N, K) matrix in ``fmt`` (None: float in ``dtype``)."""
    if fmt is None:
        return n * k * dtype.itemsize, n * k * dtype.itemsize
    kind, _, group_text = fmt.partition(":")
    bits, group = (8 if kind == "int8" else 4), int(group_text or k)
    stored = n * k * bits // 8 + n * (k // group) * 4 * (2 if bits == 4 else 1)
    return predicted_read_bytes(bits, group, n, k, dtype, device_type), stored


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
