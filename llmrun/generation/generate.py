"""The generation loop: prefill the prompt, then decode one token at a time, as an iterator.

``generate_tokens`` yields token ids and fills a ``GenerationStats`` (times in seconds);
``stream_text`` turns that into printable text chunks and applies ``--stop`` strings.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from llmrun.devices import oom_guard, synchronize
from llmrun.errors import LlmrunError
from llmrun.model.executor import decode_step, make_cache, prefill, prepare_decode
from llmrun.model.kvcache import KVCache
from llmrun.model.transformer import Transformer

Sampler = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass
class GenerationStats:
    """What one generation did. Times are seconds of wall clock; rates are tokens per second."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    reused_tokens: int = 0
    prefill_s: float = 0.0
    ttft_s: float = 0.0
    decode_s: float = 0.0
    prepare_s: float = 0.0  # building the decode fast path (packing, compile, CUDA graph) after the first token;
    # in neither ttft_s nor decode_s
    finish_reason: str = "length"

    @property
    def prefill_tok_s(self) -> float:
        """Prompt tokens run through the model per second of prefill."""
        computed = self.prompt_tokens - self.reused_tokens
        return computed / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Tokens per second after the first (each one a decode step)."""
        steps = self.generated_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0


class Conversation:
    """A KV cache and the token ids it holds, so that a follow-up prompt reuses the shared prefix."""

    def __init__(self, model: Transformer, max_seq_len: int) -> None:
        self.cache: KVCache = make_cache(model, 1, max_seq_len)
        self.tokens: list[int] = []

    def shared_prefix(self, prompt: Sequence[int]) -> int:
        """How many leading tokens of ``prompt`` are already in the cache (at least one is recomputed)."""
        n = 0
        for a, b in zip(self.tokens, prompt[:-1], strict=False):
            if a != b:
                break
            n += 1
        return n


def check_prompt_fits(prompt_len: int, context: int, model: Transformer) -> None:
    """Refuse an empty prompt, or one that leaves no room in ``context`` tokens for a new token."""
    if prompt_len == 0:
        raise LlmrunError("the prompt is empty; give some text to continue")
    if prompt_len >= context:
        whose = "the model's context" if context == model.args.context_length else "the context (--ctx-size)"
        raise LlmrunError(
            f"the prompt is {prompt_len} tokens but {whose} is {context}; shorten it "
            "(or pass --truncate to keep its last tokens)"
        )


def check_token_ids(ids: Sequence[int], model: Transformer) -> None:
    """Refuse ids the model has no embedding for: the tokenizer does not belong to these weights."""
    top = max(ids, default=0)
    if top >= model.args.vocab_size:
        raise LlmrunError(
            f"the tokenizer produced token id {top} but the model has only {model.args.vocab_size} "
            "(config.json vocab_size): tokenizer.json does not belong to these weights; use the model's own"
        )


def generate_tokens(
    model: Transformer,
    prompt: Sequence[int],
    sampler: Sampler,
    *,
    max_new_tokens: int,
    stop_ids: Iterable[int] = (),
    stats: GenerationStats | None = None,
    conversation: Conversation | None = None,
    ctx_size: int | None = None,
) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` new ids for one prompt; stop at a stop id or the context end.

    The context is ``ctx_size`` tokens (at most the model's ``context_length``, which is the default).

    The stop id itself is not yielded. ``stats`` is filled as the loop runs (``finish_reason`` is
    ``stop``, ``length`` or ``context``). With a ``conversation``, the cached prefix is reused and the
    cache holds prompt + output afterwards. Running out of memory is an ``LlmrunError`` with the numbers.
    """
    with oom_guard(model.lm_head.weight.device, "generating"):
        context = min(model.args.context_length, ctx_size or model.args.context_length)
        yield from _generate_tokens(model, prompt, sampler, max_new_tokens, stop_ids, stats, conversation, context)


def _generate_tokens(
    model: Transformer,
    prompt: Sequence[int],
    sampler: Sampler,
    max_new_tokens: int,
    stop_ids: Iterable[int],
    stats: GenerationStats | None,
    conversation: Conversation | None,
    context: int,
) -> Iterator[int]:
    stats = stats if stats is not None else GenerationStats()
    check_prompt_fits(len(prompt), context, model)
    check_token_ids(prompt, model)
    if conversation is None:
        conversation = Conversation(model, min(context, len(prompt) + max_new_tokens))
    capacity = conversation.cache.max_seq_len  # the context this generation can fill
    if len(prompt) >= capacity:
        raise LlmrunError(f"the conversation is {len(prompt)} tokens and fills the {capacity}-token context")
    stop = frozenset(stop_ids)
    device = model.lm_head.weight.device
    history = torch.empty(1, capacity, dtype=torch.long, device=device)
    history[0, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    start = conversation.shared_prefix(prompt)
    stats.prompt_tokens, stats.reused_tokens = len(prompt), start
    conversation.tokens = list(prompt)

    t0 = time.perf_counter()
    conversation.cache.trim(start)
    logits = prefill(model, history[:, start : len(prompt)], conversation.cache)
    synchronize(device)
    stats.prefill_s = time.perf_counter() - t0
    pos = len(prompt)  # position of the token sampled next
    t_first = None
    try:
        for step in range(max_new_tokens):
            token = sampler(logits, history[:, :pos])
            token_id = int(token[0])
            if t_first is None:
                t_first = time.perf_counter()
                stats.ttft_s = t_first - t0
            if token_id in stop:
                stats.finish_reason = "stop"
                return
            stats.generated_tokens += 1
            conversation.tokens.append(token_id)
            stats.decode_s = time.perf_counter() - t_first  # right even if the consumer stops here
            yield token_id
            if step == max_new_tokens - 1:
                return
            if pos + 1 >= capacity:
                stats.finish_reason = "context"
                return
            history[0, pos] = token_id
            if step == 0:  # build the decode fast path after the first token, timed apart from decode_s
                stats.prepare_s = prepare_decode(model, conversation.cache)
                t_first += stats.prepare_s
            logits = decode_step(model, token, conversation.cache, copy=False)  # a buffer reused next step
            pos += 1
    finally:
        if t_first is not None:
            stats.decode_s = time.perf_counter() - t_first


def stream_text(
    tokens: Iterable[int], decoder, stop_strings: Sequence[str] = (), stats: GenerationStats | None = None
) -> Iterator[str]:
    """Printable text chunks for ``tokens``; ends early, without the stop text, at a ``stop_strings`` match.

    On such a match the token iterator is closed and ``stats.finish_reason`` becomes ``stop``.

    ``decoder`` is a ``StreamDecoder`` (``push(id) -> str``, ``flush() -> str``). Text that could be the
    start of a stop string is held back until it is known not to be one.
    """
    stops = [s for s in stop_strings if s]
    pending = ""
    iterator = iter(tokens)
    for token_id in iterator:
        pending += decoder.push(token_id)
        cut = _first_stop(pending, stops)
        if cut is not None:
            _close(iterator)
            if stats is not None:
                stats.finish_reason = "stop"
            yield pending[:cut]
            return
        keep = _held_back(pending, stops)
        if len(pending) > keep:
            yield pending[: len(pending) - keep]
            pending = pending[len(pending) - keep :]
    pending += decoder.flush()
    cut = _first_stop(pending, stops)
    if cut is not None and stats is not None:
        stats.finish_reason = "stop"
    yield pending if cut is None else pending[:cut]


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def _close(iterator: Iterator[int]) -> None:
    close = getattr(iterator, "close", None)
    if close is not None:
        close()
