"""Perplexity of a model on a text: the numerical-correctness check users know from llama.cpp.

The text is tokenized once and cut into consecutive, non-overlapping windows of ``context``
tokens (the last one may be shorter). In each window every token after the first is predicted
from the tokens before it in that window; the NLL is averaged over all predicted tokens and
perplexity = exp(mean NLL).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmrun.errors import LlmrunError
from llmrun.generation.generate import check_token_ids
from llmrun.model.executor import forward
from llmrun.model.transformer import Transformer


@dataclass(frozen=True)
class PerplexityResult:
    """``nll`` is the mean negative log-likelihood in nats per predicted token."""

    perplexity: float
    nll: float
    tokens: int
    windows: int
    context: int


def windows(ids: Sequence[int], context: int) -> list[Sequence[int]]:
    """Consecutive windows of ``context`` ids; a last window of one token predicts nothing and is dropped."""
    return [ids[i : i + context] for i in range(0, len(ids), context) if len(ids[i : i + context]) > 1]


def perplexity(
    model: Transformer,
    ids: Sequence[int],
    context: int,
    on_window: Callable[[], None] | None = None,
) -> PerplexityResult:
    """Score ``ids`` in windows of ``context`` tokens; ``on_window`` is called after each (for progress)."""
    if context < 2:
        raise LlmrunError(f"--context must be at least 2 tokens, got {context}")
    if context > model.args.context_length:
        raise LlmrunError(f"--context {context} exceeds the model's context of {model.args.context_length}")
    chunks = windows(ids, context)
    if not chunks:
        raise LlmrunError("the text has fewer than 2 tokens; nothing to score")
    check_token_ids(ids, model)
    device = model.lm_head.weight.device
    total_nll, scored = 0.0, 0
    for chunk in chunks:
        tokens = torch.tensor([chunk], dtype=torch.long, device=device)
        logits = forward(model, tokens)[0, :-1]  # (T-1, V) float32
        total_nll += F.cross_entropy(logits, tokens[0, 1:], reduction="sum").item()
        scored += len(chunk) - 1
        if on_window is not None:
            on_window()
    nll = total_nll / scored
    return PerplexityResult(math.exp(nll), nll, scored, len(chunks), context)
