"""Which projections of a block are fused into one matrix, shared by the float and the quantized weights."""

from __future__ import annotations

# Per block: the submodule, the fused weight and bias attribute names, and the projections fused, in row order.
FUSED_PROJECTIONS = (
    ("self_attn", "wqkv", "bqkv", ("q_proj", "k_proj", "v_proj")),
    ("mlp", "wgate_up", "bgate_up", ("gate_proj", "up_proj")),
)
