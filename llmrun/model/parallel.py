"""Tensor parallelism (Megatron-style, as gpt-fast and vLLM): which slice of each weight a rank
holds, and the collectives a sharded model runs.

With ``N`` ranks, rank ``r`` holds:

* q/k/v (column-parallel): query heads ``r·h/N ..`` and their key/value heads; with fewer key/value
  heads than ranks (``k < N``, ``N`` a multiple of ``k``) each key/value head is replicated on the
  ``N/k`` ranks whose query heads read it, as vLLM does;
* o_proj (row-parallel): the input columns of those query heads; the partial products of all ranks
  are summed by one all-reduce (``attn_allreduce``);
* gate/up (column-parallel): rows ``r·f/N ..``; down (row-parallel): the same columns, then one
  all-reduce (``mlp_allreduce``);
* the embedding and the lm_head: vocabulary rows ``r·V/N ..``; a token outside a rank's rows
  embeds to zeros there and an all-reduce sums the rows, and the logits of all ranks are gathered;
* the norms: whole. A row-parallel bias is added by rank 0 only (zeros elsewhere), so the sum has
  it once.

The collectives are ``torch.distributed._functional_collectives``: functions that return new
tensors, which ``torch.compile`` and a captured CUDA graph can hold. ``Collectives`` carries the
group; a sharded ``Transformer`` has it on ``model.parallel`` and on every block.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmrun.errors import LlmrunError
from llmrun.model.config import ModelArgs

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")
VOCAB_PARALLEL = ("model.embed_tokens.weight", "lm_head.weight")


def check_tp(args: ModelArgs, tp: int) -> None:
    """``LlmrunError`` unless ``tp`` ranks can split this model: heads, FFN and vocabulary divisible,
    and key/value heads either divisible by ``tp`` or dividing it (then replicated)."""
    if tp < 1:
        raise LlmrunError(f"--tp must be at least 1, got {tp}")
    h, k = args.num_attention_heads, args.num_key_value_heads
    for what, n in (("attention heads", h), ("FFN size", args.intermediate_size), ("vocabulary", args.vocab_size)):
        if n % tp:
            raise LlmrunError(f"--tp {tp} does not divide the model's {what} ({n}); pick a --tp that divides it")
    if k % tp and tp % k:
        raise LlmrunError(
            f"--tp {tp} neither divides the model's {k} key/value heads nor is a multiple of them "
            "(to replicate each head); pick a --tp that does"
        )


@dataclass(frozen=True)
class ShardPlan:
    """Which rows or columns of each checkpoint tensor rank ``rank`` of ``size`` holds (``args``: the whole model)."""

    args: ModelArgs
    rank: int
    size: int

    def __post_init__(self) -> None:
        check_tp(self.args, self.size)

    @property
    def local_args(self) -> ModelArgs:
        """The shapes of one rank's modules: h/N heads, max(k/N, 1) key/value heads, f/N FFN, V/N vocabulary."""
        a = self.args
        return dataclasses.replace(
            a,
            num_attention_heads=a.num_attention_heads // self.size,
            num_key_value_heads=max(a.num_key_value_heads // self.size, 1),
            intermediate_size=a.intermediate_size // self.size,
            vocab_size=a.vocab_size // self.size,
            head_dim=a.head_dim,
        )

    @property
    def vocab_start(self) -> int:
        """The first vocabulary row (token id) this rank holds."""
        return self.rank * (self.args.vocab_size // self.size)

    def span(self, name: str) -> tuple[int, int, int] | None:
        """(dim, start, length) of the slice of checkpoint tensor ``name`` this rank holds; None: all of it."""
        a, local = self.args, self.local_args
        hd = a.head_dim
        if name in VOCAB_PARALLEL:
            return 0, self.vocab_start, local.vocab_size
        parts = name.split(".")
        if len(parts) < 2 or parts[-2] not in COLUMN_PARALLEL + ROW_PARALLEL:
            return None
        proj, leaf = parts[-2], parts[-1]
        if proj == "q_proj":
            return 0, self.rank * local.num_attention_heads * hd, local.num_attention_heads * hd
        if proj in ("k_proj", "v_proj"):
            first = self.rank * a.num_key_value_heads // self.size  # replicated heads: N/k ranks share one
            return 0, first * hd, local.num_key_value_heads * hd
        if proj in ("gate_proj", "up_proj"):
            return 0, self.rank * local.intermediate_size, local.intermediate_size
        if leaf == "bias":
            return None
        width = local.num_attention_heads * hd if proj == "o_proj" else local.intermediate_size
        return 1, self.rank * width, width

    def piece(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of the whole checkpoint tensor ``name`` (a view where it is a slice).

        A row-parallel bias (o_proj, down_proj) is whole on rank 0 and zeros on the others.
        """
        parts = name.split(".")
        if parts[-1] == "bias" and len(parts) > 1 and parts[-2] in ROW_PARALLEL:
            return tensor if self.rank == 0 else torch.zeros_like(tensor)
        span = self.span(name)
        return tensor if span is None else tensor.narrow(*span)


class Collectives:
    """The all-reduce and all-gather of one tensor-parallel group, as functional collectives.

    ``group`` is a ``torch.distributed`` process group of ``size`` ranks, this one ``rank``.
    """

    def __init__(self, group, rank: int, size: int) -> None:
        from torch.distributed import _functional_collectives as funcol

        self.group, self.rank, self.size = group, rank, size
        self._funcol = funcol

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of ``x`` over the ranks, any shape; a new tensor, waited for (so a probe times it)."""
        return self._wait(self._funcol.all_reduce(x, "sum", self.group))

    def gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., n) of every rank concatenated in rank order along the last dimension: (..., N·n)."""
        return self._wait(self._funcol.all_gather_single(x.contiguous(), x.dim() - 1, self.group))

    def embed(self, ids: torch.Tensor, weight: torch.Tensor, start: int) -> torch.Tensor:
        """Rows of the whole embedding for token ids (any shape) -> (*ids.shape, d), from this rank's
        rows ``weight`` (V/N, d) that begin at token ``start``: local lookups summed over the ranks."""
        outside = (ids < start) | (ids >= start + weight.shape[0])
        rows = F.embedding((ids - start).masked_fill(outside, 0), weight)
        return self.all_reduce(rows.masked_fill(outside.unsqueeze(-1), 0))

    def _wait(self, t: torch.Tensor) -> torch.Tensor:
        return t.wait() if isinstance(t, self._funcol.AsyncCollectiveTensor) else t


class VocabParallelEmbedding(nn.Embedding):
    """An embedding holding vocabulary rows ``start ..`` of the whole; ``forward`` gives whole rows."""

    def __init__(self, weight: torch.Tensor, start: int, comm: Collectives) -> None:
        super().__init__(weight.shape[0], weight.shape[1], _weight=weight)
        self.vocab_start, self.comm = start, comm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.comm.embed(ids, self.weight, self.vocab_start)


class VocabParallelHead(nn.Linear):
    """An lm_head holding vocabulary rows of the whole; ``forward`` gathers the logits (..., V)."""

    def __init__(self, hidden: int, rows: int, comm: Collectives) -> None:
        super().__init__(hidden, rows, bias=False)
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.gather_last(F.linear(x, self.weight))


def shard_modules(model: nn.Module, plan: ShardPlan, comm: Collectives) -> None:
    """Make ``model`` (a ``Transformer`` built from ``plan.local_args``, on the meta device) rank
    ``plan.rank``'s shard: ``args`` the whole model's, the collectives on it and on its blocks, and a
    vocabulary-parallel embedding and lm_head."""
    model.args, model.parallel = plan.args, comm
    for block in model.model.layers:
        block.parallel = comm
    embed = model.model.embed_tokens
    model.model.embed_tokens = VocabParallelEmbedding(embed.weight, plan.vocab_start, comm)
    model.lm_head = VocabParallelHead(embed.weight.shape[1], embed.weight.shape[0], comm)
    model.tie_weights()
