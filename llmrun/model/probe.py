"""Hook points of the executor: a probe marks each named op so that a profiler can time it.

The base ``Probe`` does nothing and costs one method call and a shared null context per op,
which is what the executor uses when profiling is off. ``llmrun.profiler.timers`` subclasses it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

_NOTHING = nullcontext()

LAYER_OPS = (
    "attn_norm",
    "qkv_proj",
    "rope",
    "attention",
    "o_proj",
    "attn_residual",
    "mlp_norm",
    "gate_up_proj",
    "act",
    "down_proj",
    "mlp_residual",
)
MODEL_OPS = ("embed", "final_norm", "lm_head", "sample")
PARALLEL_LAYER_OPS = ("attn_allreduce", "mlp_allreduce")
"""Per-layer ops of a tensor-parallel shard only (``llmrun.model.parallel``): the sums of the row-parallel products."""
FAST_LAYER_OPS = (
    "attn_norm",
    "qkv_proj",
    "rope",
    "attention",
    "o_proj+attn_residual",
    "mlp_norm",
    "gate_up_proj",
    "act",
    "down_proj+mlp_residual",
)
"""The op groups of a decode fast-path layer (``llmrun.model.fastpath.step``): a fused group joins its parts."""


class Probe:
    """Marks named ops; this base class records nothing."""

    def region(self, op: str, layer: int | None = None) -> AbstractContextManager[None]:
        """Context manager around one op; ``layer`` is the block index or None outside the blocks."""
        return _NOTHING

    def mark(self, op: str | None, layer: int | None = None) -> None:
        """The work since the previous mark (or the step's start) was ``op`` at ``layer``; None: no named op.

        The fast decode path marks the end of each op group instead of entering a region, one call
        per group; this base class ignores it.
        """


NULL_PROBE = Probe()
