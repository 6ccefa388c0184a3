"""Perplexity of a model on a text: the numerical-correctness check users know from llama.cpp.

The text is tokenized once and scored in windows of ``context`` tokens; perplexity is exp(mean
NLL) over the tokens scored, with the standard error of that mean as llama-perplexity gives it
(``± ppl·stderr``). Two ways to cut the windows:

* the default: windows start every ``stride`` tokens (``context`` unless given: consecutive and
  non-overlapping) and each scores the tokens the previous one did not, each predicted from the
  tokens before it in its window (Hugging Face's sliding-window perplexity; a window's first token
  has nothing before it and is not scored);
* ``llama_cpp``: as llama-perplexity: ``len // context`` non-overlapping windows (at least two),
  each starting with BOS where the tokenizer adds one (the window's first token replaced), scoring
  only the tokens after the first half of the window (positions context/2+1 .. context-1).
  With a ``stride`` it is llama-perplexity's ``--ppl-stride``: windows every ``stride`` tokens
  scoring their last ``stride`` tokens, no BOS.
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
    """``nll`` is the mean negative log-likelihood in nats per scored token; ``nll_stderr`` its standard
    error (nats) and ``perplexity_stderr`` = perplexity x nll_stderr (llama-perplexity's ``±``)."""

    perplexity: float
    nll: float
    tokens: int
    windows: int
    context: int
    nll_stderr: float = 0.0
    perplexity_stderr: float = 0.0
    stride: int = 0
    mode: str = "default"


@dataclass(frozen=True)
class Window:
    """Tokens ``begin..end-1`` of the text, run together; the ones at ``scored_from..end-1`` are scored.

    ``bos`` replaces the window's first token (llama-perplexity's BOS at each window start).
    """

    begin: int
    end: int
    scored_from: int
    bos: int | None = None


def windows(ids: Sequence[int], context: int) -> list[Sequence[int]]:
    """Consecutive windows of ``context`` ids; a last window of one token predicts nothing and is dropped."""
    return [ids[w.begin : w.end] for w in sliding_windows(len(ids), context, context)]


def sliding_windows(n: int, context: int, stride: int) -> list[Window]:
    """Windows of ``context`` of ``n`` tokens, one every ``stride``, each scoring what the last did not."""
    plan, scored_to, begin = [], 1, 0
    while scored_to < n:
        end = min(begin + context, n)
        scored_from = max(scored_to, begin + 1)
        if scored_from < end:
            plan.append(Window(begin, end, scored_from))
        scored_to = max(scored_to, end)
        begin += stride
    return plan


def llama_cpp_windows(n: int, context: int, stride: int | None, bos: int | None) -> list[Window]:
    """llama-perplexity's windows of ``n`` tokens (see the module docstring); ``LlmrunError`` if too few."""
    if stride is None:
        if n < 2 * context:
            raise LlmrunError(
                f"the text is {n} tokens; llama.cpp's scoring needs at least 2 x --context = {2 * context}"
            )
        first = context // 2
        return [Window(k * context, (k + 1) * context, k * context + first + 1, bos) for k in range(n // context)]
    if n <= context:
        raise LlmrunError(f"the text is {n} tokens; llama.cpp's --ppl-stride scoring needs more than --context")
    count = (n - context + stride - 1) // stride
    return [Window(i * stride, i * stride + context, i * stride + context - stride) for i in range(count)]


def perplexity(
    model: Transformer,
    ids: Sequence[int],
    context: int,
    on_window: Callable[[float], None] | None = None,
    *,
    stride: int | None = None,
    llama_cpp: bool = False,
    bos: int | None = None,
) -> PerplexityResult:
    """Score ``ids`` in windows of ``context`` tokens; ``on_window(running perplexity)`` after each.

    ``stride`` (tokens, 1..context; 1..context-1 with ``llama_cpp``) moves the windows by less than
    their length; ``llama_cpp`` scores as llama-perplexity, with ``bos`` (the tokenizer's BOS id when
    it adds one, else None) at every window start.
    """
    plan = plan_windows(model, len(ids), context, stride=stride, llama_cpp=llama_cpp, bos=bos)
    check_token_ids(ids, model)
    device = model.lm_head.weight.device
    total, squares, scored = 0.0, 0.0, 0
    for window in plan:
        tokens = torch.tensor([ids[window.begin : window.end]], dtype=torch.long, device=device)
        if window.bos is not None:
            tokens[0, 0] = window.bos
        nll = window_nll(model, tokens, window.scored_from - window.begin)
        total += nll.sum().item()
        squares += nll.square().sum().item()
        scored += nll.numel()
        if on_window is not None:
            on_window(math.exp(total / scored))
    mean = total / scored
    stderr = _stderr(mean, squares / scored, scored)
    mode = "llama.cpp" if llama_cpp else "default"
    step = stride or context
    return PerplexityResult(
        math.exp(mean), mean, scored, len(plan), context, stderr, math.exp(mean) * stderr, step, mode
    )


def window_nll(model: Transformer, tokens: torch.Tensor, first: int) -> torch.Tensor:
    """NLL in nats (float64) of tokens (1, T)'s ids at offsets first..T-1, each given those before it: (T-first,)."""
    logits = forward(model, tokens)[0, first - 1 : -1]  # (T-first, V) float32
    return F.cross_entropy(logits, tokens[0, first:], reduction="none").double()


def _stderr(mean: float, mean_square: float, count: int) -> float:
    """Standard error of a mean of ``count`` values, llama-perplexity's: sqrt((E[x²] - E[x]²) / (count - 1))."""
    variance = mean_square - mean * mean
    return math.sqrt(variance / (count - 1)) if variance > 0 and count > 1 else 0.0


def plan_windows(
    model: Transformer,
    n: int,
    context: int,
    *,
    stride: int | None = None,
    llama_cpp: bool = False,
    bos: int | None = None,
) -> list[Window]:
    """The windows ``perplexity`` scores for a text of ``n`` tokens; ``LlmrunError`` for a bad context or stride."""
    if context < 2:
        raise LlmrunError(f"--context must be at least 2 tokens, got {context}")
    if context > model.args.context_length:
        raise LlmrunError(f"--context {context} exceeds the model's context of {model.args.context_length}")
    longest = context - 1 if llama_cpp else context
    if stride is not None and not 1 <= stride <= longest:
        raise LlmrunError(f"--stride must be between 1 and {longest} (--context{' - 1' * llama_cpp}), got {stride}")
    if llama_cpp:
        return llama_cpp_windows(n, context, stride, bos)
    plan = sliding_windows(n, context, stride or context)
    if not plan:
        raise LlmrunError("the text has fewer than 2 tokens; nothing to score")
    return plan
