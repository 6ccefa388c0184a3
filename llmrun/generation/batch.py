"""Many prompts at once: one left-padded batch through the executor, each row with its own sampler.

``generate_batch`` gives every prompt what ``generate_tokens`` would give it alone: the same stop
rules, the same budget (``max_new_tokens``, the context), its own ``Sampler`` (settings and seeded
generator) drawing once per step, and the repetition penalty over its own tokens. Prompts of
different lengths are padded on the left (``llmrun.model.executor.forward``'s ``padding``), so
every row decodes at the same cache position; a padded batch decodes on the eager path, an
unpadded one on the fast path. A row that has finished stays in the batch, idle, until the last
one is done.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from llmrun.devices import oom_guard, synchronize
from llmrun.generation.generate import GenerationStats, check_prompt_fits, check_token_ids
from llmrun.generation.sampling import Sampler
from llmrun.model.executor import decode_step, make_cache, prefill, prepare_decode
from llmrun.model.transformer import Transformer


@dataclass
class BatchRow:
    """One prompt of a batch: ids in, ``tokens`` and ``stats`` out (times in seconds)."""

    ids: Sequence[int]
    sampler: Sampler
    max_new_tokens: int
    tokens: list[int] = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)
    limit: int = 0  # tokens the row may emit: its budget, cut by the context
    history: torch.Tensor | None = None  # (1, prompt + limit) ids so far, for the repetition penalty
    done: bool = False

    @property
    def pos(self) -> int:
        """Ids the row holds so far (prompt + generated)."""
        return len(self.ids) + len(self.tokens)


def generate_batch(
    model: Transformer,
    rows: Sequence[BatchRow],
    *,
    stop_ids: Iterable[int] = (),
    ctx_size: int | None = None,
    on_step: Callable[[int], None] | None = None,
) -> None:
    """Generate for every row together; each row's ``tokens`` and ``stats`` are filled in place.

    A row stops, as ``generate_tokens`` does, at a stop id (not kept; ``finish_reason`` "stop"),
    after ``max_new_tokens`` ("length") or where its context of ``ctx_size`` tokens (at most the
    model's, the default) is full ("context"). Every row's ``prefill_s`` is the batch's prefill;
    ``ttft_s`` and ``decode_s`` are the row's own first and last token times. ``on_step(n)`` is
    called after each step with the number of tokens it added (for progress).
    """
    with oom_guard(model.lm_head.weight.device, f"generating a batch of {len(rows)}"):
        context = min(model.args.context_length, ctx_size or model.args.context_length)
        _generate_batch(model, rows, frozenset(stop_ids), context, on_step or (lambda n: None))


def _generate_batch(
    model: Transformer, rows: Sequence[BatchRow], stop: frozenset[int], context: int, on_step: Callable[[int], None]
) -> None:
    device = model.lm_head.weight.device
    longest = max(len(row.ids) for row in rows)
    for row in rows:
        check_prompt_fits(len(row.ids), context, model)
        check_token_ids(row.ids, model)
        row.limit = min(row.max_new_tokens, context - len(row.ids))  # generate_tokens' capacity, less the prompt
        row.history = torch.empty(1, len(row.ids) + row.limit, dtype=torch.long, device=device)
        row.history[0, : len(row.ids)] = torch.tensor(row.ids, dtype=torch.long)
        row.stats.prompt_tokens = len(row.ids)
    padding = torch.tensor([longest - len(row.ids) for row in rows], dtype=torch.long)
    tokens = torch.zeros(len(rows), longest, dtype=torch.long)  # padded with id 0: masked out, any id would do
    for b, row in enumerate(rows):
        tokens[b, padding[b] :] = torch.tensor(row.ids, dtype=torch.long)
    cache = make_cache(model, len(rows), longest + max(row.limit for row in rows) - 1)

    t0 = time.perf_counter()
    logits = prefill(model, tokens.to(device), cache, padding=padding.to(device))
    synchronize(device)
    prefill_s = time.perf_counter() - t0
    for row in rows:
        row.stats.prefill_s = prefill_s
    prepare_s = 0.0  # building the fast path, after the first token: in no row's times
    next_ids = torch.zeros(len(rows), dtype=torch.long, device=device)
    for step in range(max(row.limit for row in rows)):
        now = time.perf_counter() - t0 - prepare_s
        before = sum(len(row.tokens) for row in rows)
        for b, row in enumerate(rows):
            if not row.done:
                next_ids[b] = _sample(row, logits[b : b + 1], stop, now)
        on_step(sum(len(row.tokens) for row in rows) - before)
        if all(row.done for row in rows):
            return
        if step == 0:
            prepare_s = prepare_decode(model, cache)  # 0 for a padded cache: it decodes eagerly
        logits = decode_step(model, next_ids, cache, copy=False)  # a buffer reused next step


def _sample(row: BatchRow, logits: torch.Tensor, stop: frozenset[int], now: float) -> int:
    """Draw the row's next id from its logits (1, V) and record it; ``now`` is seconds since the batch began."""
    stats = row.stats
    pos = row.pos
    token_id = int(row.sampler(logits, row.history[:, :pos])[0])
    if not row.tokens:  # the first draw (a finished row is never drawn again)
        stats.ttft_s = now
    if token_id in stop:
        stats.finish_reason = "stop"
        row.done = True
        return token_id
    row.tokens.append(token_id)
    stats.generated_tokens += 1
    stats.decode_s = now - stats.ttft_s
    if len(row.tokens) == row.max_new_tokens:
        row.done = True  # finish_reason stays "length"
    elif len(row.tokens) == row.limit:
        stats.finish_reason, row.done = "context", True
    else:
        row.history[0, pos] = token_id
    return token_id
