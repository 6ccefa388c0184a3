"""Run prefill and decode under an ``OpTimer``: warm-up, then repeats, per (batch, prompt length).

Each repeat is one prefill of ``prompt_len`` random tokens per sequence (plus sampling the first
new token) followed by ``decode_tokens`` decode steps, each one new token per sequence plus its
sampling (greedy argmax, the ``sample`` op). The prefill is one measured step; every decode step
is one measured step. Warm-up repeats run the same code and are discarded.

Decode runs on ``path`` ``fast`` (the fast decoder, as generation and ``llmrun bench``, through
``llmrun.profiler.steps.decode_token``) or ``eager`` (the executor's layer-by-layer ops); prefill
has no separate fast path and always runs eager. After the probed decode steps of a repeat, the
cache is trimmed back to the prompt and the same tokens are decoded again without a probe, each
step timed as a whole: what the probe costs, and the step exactly as ``bench`` times it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter

import torch

from llmrun.devices import check_fits, synchronize
from llmrun.errors import LlmrunError
from llmrun.model.config import ModelArgs
from llmrun.model.executor import make_cache, prefill
from llmrun.model.kvcache import KVCache
from llmrun.model.memory import activation_bytes, kv_cache_bytes
from llmrun.model.transformer import Transformer
from llmrun.profiler.steps import decode_path, decode_token, profiled_step
from llmrun.profiler.timers import OpTimer, StepTiming

PATHS = ("fast", "eager")


@dataclass
class PhaseTiming:
    """The measured steps of one phase at one batch and prompt length.

    ``decode_tokens`` is the number of decode steps per repeat (0 for prefill); the decode steps
    run at positions prompt_len .. prompt_len + decode_tokens - 1. ``path`` is what ran (``fast`` or
    ``eager``); ``unprobed_s`` the wall seconds of the same decode steps run without a probe.
    """

    phase: str
    batch: int
    prompt_len: int
    decode_tokens: int
    steps: list[StepTiming]
    path: str = "eager"
    unprobed_s: list[float] = field(default_factory=list)


def _sample(logits: torch.Tensor, timer: OpTimer) -> torch.Tensor:
    """Greedy next token (B,) from logits (B, V), timed as the ``sample`` op."""
    with timer.region("sample"):
        return logits.argmax(-1)


def check_context(args: ModelArgs, prompt_len: int, decode_tokens: int) -> None:
    """``LlmrunError`` unless a prompt of ``prompt_len`` tokens and ``decode_tokens`` steps fit the model's context."""
    limit = args.context_length
    if prompt_len + decode_tokens > limit:
        raise LlmrunError(
            f"--prompt-len {prompt_len} plus --decode-tokens {decode_tokens} exceeds the model's context of {limit}"
        )


def check_memory(model: Transformer, batch: int, n_prompt: int, positions: int, doing: str) -> None:
    """``LlmrunError`` (``llmrun.devices.check_fits``) unless the memory free holds what one run of
    ``batch`` sequences of ``n_prompt`` prompt tokens in a cache of ``positions`` allocates: its KV
    cache and one forward pass's activations (``doing`` names the run)."""
    weight = model.lm_head.weight
    cache = kv_cache_bytes(model.args, batch, positions, weight.dtype)
    step = activation_bytes(model.args, batch, max(n_prompt, 1), positions, weight.dtype)
    check_fits(cache + step, weight.device, f"{doing} (KV cache and activations)")


def measure_config(
    model: Transformer,
    batch: int,
    prompt_len: int,
    decode_tokens: int,
    *,
    repeats: int,
    warmup: int = 1,
    seed: int = 0,
    path: str = "fast",
    on_step: Callable[[], None] | None = None,
) -> list[PhaseTiming]:
    """Prefill and decode timings of ``model`` at one (batch, prompt_len); decode omitted when 0 tokens.

    ``path`` (``PATHS``) is the decode path: ``fast`` falls back to ``eager`` where the fast path does
    not apply, and the decode ``PhaseTiming`` says which ran.
    """
    args = model.args
    if prompt_len < 1 or batch < 1 or decode_tokens < 0 or repeats < 1:
        raise LlmrunError("--prompt-len, --batch and --repeats must be at least 1, --decode-tokens at least 0")
    if path not in PATHS:
        raise LlmrunError(f"--path {path!r}: expected one of {', '.join(PATHS)}")
    check_context(args, prompt_len, decode_tokens)
    device = model.model.embed_tokens.weight.device
    cache = make_cache(model, batch, prompt_len + decode_tokens)
    fast = decode_path(model, cache, fast=path == "fast") == "fast" if decode_tokens else False
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, args.vocab_size, (batch, prompt_len), generator=gen).to(device)
    timer = OpTimer(device)
    probed = profiled_step(model, cache, timer, fast=fast)
    prefill_steps: list[StepTiming] = []
    decode_steps: list[StepTiming] = []
    unprobed: list[float] = []
    for repeat in range(warmup + repeats):
        timer.reset()
        cache.reset()
        with timer.step():
            token = _sample(prefill(model, tokens, cache, timer), timer)
        fed = []
        for _ in range(decode_tokens):
            fed.append(token)
            with timer.step():
                token = _sample(probed(token), timer)
            if on_step:
                on_step()
        walls = unprobed_steps(model, cache, fed, fast=fast)
        if repeat >= warmup:
            prefill_steps.append(timer.steps[0])
            decode_steps.extend(timer.steps[1:])
            unprobed.extend(walls)
        if on_step:
            on_step()
    runs = [PhaseTiming("prefill", batch, prompt_len, 0, prefill_steps)]
    if decode_tokens:
        runs.append(PhaseTiming("decode", batch, prompt_len, decode_tokens, decode_steps, _path(fast), unprobed))
    return runs


def _path(fast: bool) -> str:
    return "fast" if fast else "eager"


def unprobed_steps(model: Transformer, cache: KVCache, fed: list[torch.Tensor], *, fast: bool) -> list[float]:
    """Wall seconds of each decode step of the token ids ``fed`` ((B,) each), again, without a probe.

    The cache is trimmed back to before the first of them, so every step runs at the position it
    ran at when probed and attends over the same keys.
    """
    device = model.model.embed_tokens.weight.device
    cache.trim(cache.length - len(fed))
    walls = []
    for token in fed:
        synchronize(device)
        t0 = perf_counter()
        decode_token(model, token, cache, fast=fast)
        synchronize(device)
        walls.append(perf_counter() - t0)
    return walls


def measure(
    model: Transformer,
    batches: list[int],
    prompt_lens: list[int],
    decode_tokens: int,
    *,
    repeats: int,
    warmup: int = 1,
    seed: int = 0,
    path: str = "fast",
    on_step: Callable[[], None] | None = None,
) -> list[PhaseTiming]:
    """``measure_config`` over every batch × prompt length, prefill runs first, then decode runs."""
    runs = []
    for batch in batches:
        for prompt_len in prompt_lens:
            runs += measure_config(
                model,
                batch,
                prompt_len,
                decode_tokens,
                repeats=repeats,
                warmup=warmup,
                seed=seed,
                path=path,
                on_step=on_step,
            )
    return sorted(runs, key=lambda r: r.phase != "prefill")
