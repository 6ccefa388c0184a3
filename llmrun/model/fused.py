"""A block's linear ops, and which projections are fused into one matrix: shared by the float and the
quantized weights, the cost model and the memory predictions."""

from __future__ import annotations

# Per block: the submodule, the fused weight and bias attribute names, and the projections fused, in row order.
FUSED_PROJECTIONS = (
    ("self_attn", "wqkv", "bqkv", ("q_proj", "k_proj", "v_proj")),
    ("mlp", "wgate_up", "bgate_up", ("gate_proj", "up_proj")),
)

# Each linear op of a block: the submodule and the projections it multiplies by, in row order
# (two or more: fused into one matrix, as ``FUSED_PROJECTIONS`` names it).
BLOCK_LINEAR_OPS = {
    "qkv_proj": ("self_attn", ("q_proj", "k_proj", "v_proj")),
    "o_proj": ("self_attn", ("o_proj",)),
    "gate_up_proj": ("mlp", ("gate_proj", "up_proj")),
    "down_proj": ("mlp", ("down_proj",)),
}
