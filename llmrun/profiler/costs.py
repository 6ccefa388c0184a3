"""Analytical FLOPs and main-memory bytes of every named op, per phase.

This is llmrun's one cost model: ``llmrun info``, ``llmrun bench``, ``llmrun profile`` and the
kernel floor all take their FLOPs and bytes from here (docs/roofline.md tabulates the formulas).
A multiply-add counts 2 FLOPs, as nanoGPT and PaLM count. Notation: d = hidden_size, h = query heads,
k = key/value heads, hd = head_dim, f = intermediate_size, V = vocab_size, B = batch,
T = new tokens per sequence in this step, ``start`` = positions already in the KV cache,
S = start + T = context seen by attention after this step.

Conventions, stated once (the report repeats them):

* Linear layers: 2·M·N·K FLOPs for an (M, K) @ (K, N) product; a bias add is not counted.
  This is exactly what ``torch.utils.flop_counter.FlopCounterMode`` counts for ``aten.mm``.
* Attention (QKᵀ and PV) counts the **causal** work: query i of the T new tokens attends to
  start + i + 1 keys, so FLOPs = 4·B·h·hd·(T·start + T(T+1)/2). In decode (T = 1) that is every
  cached key, 4·B·h·hd·S; in a prefill from position 0 it is about half of the full T×S square
  that a non-causal count (and ``FlopCounterMode``) reports. Softmax and scaling are not counted.
  A sliding window w (Mistral, some Qwen2 layers) caps each query at w keys.
* Bytes are a lower bound on main-memory traffic: each op reads its inputs and weights once and
  writes its outputs once (what a fused kernel would move). Weights are read once per step
  whatever the batch; the embedding reads only the looked-up rows; a tied lm_head reads the whole
  matrix. Each weight matrix counts its own bytes per element (``Widths.weight``): a quantized one
  its codes plus its scales and zeros in the form its kernel reads. The KV cache (GQA: k heads,
  not h) is read over all S positions and written for the T new ones. The executor's lm_head
  writes float32 logits.
* Element-wise ops count a few FLOPs per element: RMSNorm 4 (square, sum, scale, weight),
  RoPE 3 (two multiplies, one add), SiLU·mul 5, residual add 1, argmax 1 per compare.
* In prefill only the last position goes through final_norm, lm_head and sample (``last_only``).

Fused op names (``gate_up_proj+act``) cost the sum of their parts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from torch import nn

from llmrun.model.config import ModelArgs
from llmrun.model.fused import BLOCK_LINEAR_OPS, FUSED_PROJECTIONS
from llmrun.model.parallel import ShardPlan
from llmrun.model.probe import LAYER_OPS, MODEL_OPS, PARALLEL_LAYER_OPS
from llmrun.model.quant import QuantEmbedding, is_quantized, read_bytes
from llmrun.model.quant.product import Weight
from llmrun.model.transformer import Transformer

LAYER_LINEAR_OPS = tuple(BLOCK_LINEAR_OPS)  # qkv_proj, o_proj, gate_up_proj, down_proj: those inside each block
LINEAR_OPS = (*LAYER_LINEAR_OPS, "lm_head")
"""The ops that are matrix multiplications with weights (what ``FlopCounterMode`` sees as aten.mm)."""

LOGITS_BYTES = 4  # the executor returns float32 logits
TOKEN_BYTES = 8  # int64 token ids

ATTENTION_CONVENTION = (
    "causal: query i of the T new tokens attends to start+i+1 keys (at most the sliding window), so "
    "attention FLOPs = 4*B*h*hd*(T*start + T*(T+1)/2), about half the full T*S square in a prefill "
    "(decode: 4*B*h*hd*S); softmax not counted"
)


@dataclass(frozen=True)
class Cost:
    """FLOPs and main-memory bytes of one op instance (one layer, one step)."""

    flops: float
    bytes: float

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes)


@dataclass(frozen=True)
class Widths:
    """Bytes per element: weights ``w``, activations ``a``, KV cache ``c``; ``matrices`` the weight
    matrices' own where they differ from ``w`` (quantized: codes plus scales and zeros, fractional),
    by (op, layer): an op of ``LINEAR_OPS`` or ``embed`` (per looked-up row), layer None for every
    layer (and for the ops outside the blocks)."""

    w: float
    a: int
    c: int
    matrices: Mapping[tuple[str, int | None], float] = field(default_factory=dict, hash=False)

    @classmethod
    def uniform(cls, nbytes: int) -> Widths:
        """Weights, activations and cache all in one dtype of ``nbytes`` bytes per element."""
        return cls(nbytes, nbytes, nbytes)

    def weight(self, op: str, layer: int | None = None) -> float:
        """Bytes per element of ``op``'s weight matrix at ``layer`` (its own, else every layer's, else ``w``)."""
        return self.matrices.get((op, layer), self.matrices.get((op, None), self.w))


def attention_cost(
    args: ModelArgs, batch: int, tokens: int, start: int, widths: Widths, window: int | None = None
) -> Cost:
    """Causal attention of ``tokens`` new queries after ``start`` cached positions (see the module docstring).

    With a sliding ``window`` w, query i sees min(start+i+1, w) keys and the cache is read over the
    last min(S, T+w-1) positions only (a lower bound: the executor's masked kernel reads them all).
    """
    h, k, hd = args.num_attention_heads, args.num_key_value_heads, args.head_dim
    a, c = widths.a, widths.c
    bt = batch * tokens
    s = start + tokens
    pairs = causal_pairs(start + 1, s, window)
    keys_read = s if window is None else min(s, tokens + window - 1)
    return Cost(
        4 * batch * h * hd * pairs,
        a * bt * 2 * h * hd  # q in, output out
        + a * bt * 2 * k * hd  # new k, v in
        + c * bt * 2 * k * hd  # new k, v written to the cache
        + c * batch * keys_read * 2 * k * hd,  # k, v of the attended positions read
    )


def causal_pairs(first: int, last: int, window: int | None = None) -> int:
    """The (query, key) pairs of causal attention whose queries see ``first`` .. ``last`` keys.

    That is sum(min(p, window) for p in first..last), in closed form (no window: sum(p)); a step of
    T new tokens after ``start`` cached ones has first = start + 1 and last = start + T.
    """
    if window is None or last <= window:
        return (first + last) * (last - first + 1) // 2
    if first > window:
        return window * (last - first + 1)
    return (first + window) * (window - first + 1) // 2 + window * (last - window)


def layer_costs(
    args: ModelArgs,
    batch: int,
    tokens: int,
    start: int,
    widths: Widths,
    window: int | None = None,
    layer: int | None = None,
) -> dict[str, Cost]:
    """Cost of each per-layer op for ``batch`` sequences of ``tokens`` new tokens after ``start`` cached ones
    (the weight matrices at ``widths.weight(op, layer)`` bytes per element; norms and biases at ``w``)."""
    d, f, hd = args.hidden_size, args.intermediate_size, args.head_dim
    h, k = args.num_attention_heads, args.num_key_value_heads
    w, a = widths.w, widths.a
    wqkv, wo, wgu, wdown = (widths.weight(op, layer) for op in LAYER_LINEAR_OPS)
    bt = batch * tokens
    qkv = (h + 2 * k) * hd
    norm = Cost(4 * bt * d, 2 * a * bt * d + w * d)
    residual = Cost(bt * d, 3 * a * bt * d)
    qkv_bias = w * qkv if args.attention_bias else 0
    o_bias = w * d if args.attention_bias and args.model_type == "llama" else 0
    mlp_bias = args.mlp_bias
    return {
        "attn_norm": norm,
        "qkv_proj": Cost(2 * bt * d * qkv, wqkv * d * qkv + qkv_bias + a * bt * (d + qkv)),
        "rope": Cost(3 * bt * (h + k) * hd, 2 * a * bt * (h + k) * hd + 2 * a * tokens * hd),
        "attention": attention_cost(args, batch, tokens, start, widths, window),
        "o_proj": Cost(2 * bt * h * hd * d, wo * h * hd * d + o_bias + a * bt * (h * hd + d)),
        "attn_residual": residual,
        "mlp_norm": norm,
        "gate_up_proj": Cost(4 * bt * d * f, 2 * wgu * d * f + (2 * w * f if mlp_bias else 0) + a * bt * (d + 2 * f)),
        "act": Cost(5 * bt * f, 3 * a * bt * f),
        "down_proj": Cost(2 * bt * f * d, wdown * f * d + (w * d if mlp_bias else 0) + a * bt * (f + d)),
        "mlp_residual": residual,
    }


def model_costs(args: ModelArgs, batch: int, tokens: int, widths: Widths) -> dict[str, Cost]:
    """Cost of the ops outside the layers; only the last position reaches final_norm, lm_head, sample."""
    d, v = args.hidden_size, args.vocab_size
    w, a = widths.w, widths.a
    bt = batch * tokens
    return {
        "embed": Cost(0, TOKEN_BYTES * bt + widths.weight("embed") * bt * d + a * bt * d),
        "final_norm": Cost(4 * batch * d, 2 * a * batch * d + w * d),
        "lm_head": Cost(2 * batch * d * v, widths.weight("lm_head") * d * v + a * batch * d + LOGITS_BYTES * batch * v),
        "sample": Cost(batch * v, LOGITS_BYTES * batch * v + TOKEN_BYTES * batch),
    }


def rank_args(args: ModelArgs, tp: int) -> ModelArgs:
    """The shapes one of ``tp`` tensor-parallel ranks computes with (``args`` itself for ``tp`` 1)."""
    return args if tp == 1 else ShardPlan(args, 0, tp).local_args


def ring_allreduce_bytes(message_bytes: float, tp: int) -> float:
    """Bytes each rank sends (and receives) in a ring all-reduce of ``message_bytes``: 2(N-1)/N of it."""
    return 2 * (tp - 1) / tp * message_bytes


def communication_costs(args: ModelArgs, batch: int, tokens: int, widths: Widths, tp: int) -> dict[str, Cost]:
    """Per layer of a ``tp``-rank shard: the all-reduces of the (B·T, d) activations after o_proj and down_proj.

    Their bytes are link bytes (``ring_allreduce_bytes``), no FLOPs counted.
    """
    cost = Cost(0, ring_allreduce_bytes(widths.a * batch * tokens * args.hidden_size, tp))
    return dict.fromkeys(PARALLEL_LAYER_OPS, cost)


def step_costs(
    args: ModelArgs, batch: int, tokens: int, start: int, widths: Widths, tp: int = 1
) -> dict[tuple[str, int | None], Cost]:
    """Cost of every (op, layer) of one step; layer is None for the ops outside the blocks.

    With ``tp`` > 1: one rank's share (``rank_args``), its all-reduces, and the sample over the
    gathered vocabulary.
    """
    rank = rank_args(args, tp)
    comm = communication_costs(args, batch, tokens, widths, tp) if tp > 1 else {}
    ops = LAYER_OPS + (PARALLEL_LAYER_OPS if tp > 1 else ())
    kinds: dict[tuple, dict[str, Cost]] = {}  # layers with the same window and matrix widths cost the same
    costs: dict[tuple[str, int | None], Cost] = {}
    for i, window in enumerate(args.attention_windows()):
        kind = (window, *(widths.weight(op, i) for op in LAYER_LINEAR_OPS))
        if kind not in kinds:
            kinds[kind] = {**layer_costs(rank, batch, tokens, start, widths, window, i), **comm}
        costs.update({(op, i): kinds[kind][op] for op in ops})
    costs.update({(op, None): cost for op, cost in model_costs(rank, batch, tokens, widths).items()})
    costs[("sample", None)] = model_costs(args, batch, tokens, widths)["sample"]
    return costs


def total(costs: dict[tuple[str, int | None], Cost]) -> Cost:
    """The FLOPs and bytes of a whole step (or phase): the sum over its ops."""
    return Cost(sum(c.flops for c in costs.values()), sum(c.bytes for c in costs.values()))


def model_widths(model: Transformer) -> Widths:
    """The widths of a loaded model: its dtype's size for the activations, the cache and the float
    weights; with quantized weights each matrix's own, per (op, layer), from the form its kernel
    reads per product (``llmrun.model.quant.read_bytes``: the codes and the scales (and zeros) in
    the dtype the kernel holds them in), and the embedding's per looked-up row."""
    dtype_bytes = model.model.norm.weight.element_size()
    if not is_quantized(model):
        return Widths(dtype_bytes, dtype_bytes, dtype_bytes)
    matrices: dict[tuple[str, int | None], float] = {}
    for i, block in enumerate(model.model.layers):
        for op, weights in _block_matrices(block).items():
            matrices[(op, i)] = sum(read_bytes(w) for w in weights) / sum(w.shape[0] * w.shape[1] for w in weights)
    head, embed = model.lm_head.weight, model.model.embed_tokens
    matrices[("lm_head", None)] = read_bytes(head) / (head.shape[0] * head.shape[1])
    row = embed.row_bytes() if isinstance(embed, QuantEmbedding) else embed.weight[0].nbytes
    matrices[("embed", None)] = row / model.args.hidden_size
    return Widths(dtype_bytes, dtype_bytes, dtype_bytes, matrices)


def _block_matrices(block: nn.Module) -> dict[str, list[Weight]]:
    """The weights each linear op of a block multiplies by: a fused matrix, or its parts'."""
    fused_attr = {parts: attr for _, attr, _, parts in FUSED_PROJECTIONS}
    out = {}
    for op, (owner_name, parts) in BLOCK_LINEAR_OPS.items():
        owner = getattr(block, owner_name)
        fused = getattr(owner, fused_attr[parts]) if parts in fused_attr else None
        out[op] = [fused] if fused is not None else [getattr(owner, part).weight for part in parts]
    return out


def decode_weight_bytes(args: ModelArgs, width: float | Widths) -> int:
    """Bytes of the weights one decode step of one sequence reads: ``width`` bytes per element, or
    each matrix at its own width (a model's ``Widths``).

    Every weight of the blocks and the final norm once, the whole lm_head (tied or not) and one
    row of the embedding: the bytes of ``step_costs`` that scale with the weight width.
    """
    weights = replace(width, a=0, c=0) if isinstance(width, Widths) else Widths(width, 0, 0)
    read = total(step_costs(args, 1, 1, 0, weights))
    fixed = total(step_costs(args, 1, 1, 0, Widths(0, 0, 0)))  # token ids and float32 logits
    return int(read.bytes - fixed.bytes)


def op_cost(costs: dict[tuple[str, int | None], Cost], op: str, layer: int | None) -> Cost:
    """The cost of ``op`` at ``layer``; a fused name such as ``gate_up_proj+act`` sums its parts."""
    total = Cost(0, 0)
    for part in op.split("+"):
        if (part, layer) not in costs:
            known = ", ".join((*LAYER_OPS, *MODEL_OPS))
            raise KeyError(f"no cost model for op {part!r} (layer {layer}); known ops: {known}")
        total = total + costs[(part, layer)]
    return total


def prefill_costs(
    args: ModelArgs, batch: int, prompt_len: int, widths: Widths, tp: int = 1
) -> dict[tuple[str, int | None], Cost]:
    """One prefill of ``prompt_len`` tokens per sequence from an empty cache (one of ``tp`` ranks' share)."""
    return step_costs(args, batch, prompt_len, 0, widths, tp)


def decode_costs(
    args: ModelArgs, batch: int, prompt_len: int, steps: int, widths: Widths, tp: int = 1
) -> dict[tuple[str, int | None], Cost]:
    """One decode step, averaged over ``steps`` steps after a ``prompt_len``-token prefill (one of ``tp`` ranks' share).

    Step j (0-based) runs one token at position prompt_len + j, so its attention sees
    prompt_len + j + 1 keys; only attention depends on j, and its mean is taken exactly.
    """
    if steps < 1:
        raise ValueError("steps must be at least 1")
    costs = step_costs(args, batch, 1, prompt_len, widths, tp)
    windows, rank = args.attention_windows(), rank_args(args, tp)
    mean = {}
    for w in set(windows):
        parts = [attention_cost(rank, batch, 1, prompt_len + j, widths, w) for j in range(steps)]
        mean[w] = Cost(sum(p.flops for p in parts) / steps, sum(p.bytes for p in parts) / steps)
    costs.update({("attention", i): mean[w] for i, w in enumerate(windows)})
    return costs
