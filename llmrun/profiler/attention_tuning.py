"""CPU prefill's attention kernel chosen by measuring both on this machine, never by a dtype rule.

Prefill attends with SDPA or with ``llmrun.model.attention.blocked_attention``; which is faster
depends on the CPU, its vector units, the dtype, the head shape and the PyTorch build. So the first
time a model of a given head shape prefills on a CPU, both kernels run on random q/k/v of that
shape (batch 1, one layer's heads) at ``PROMPT_LENS`` tokens, and the one with the lower sum of
median seconds over those lengths is kept (a kernel far slower at a length is timed no further and
loses). Attention's work grows with the square of the prompt,
so the sum weighs the long prompt most, where attention is the largest share of a prefill and the
choice saves the most time; the short one still counts where the two are close. The measurement
costs at most (1 + ``REPEATS``) calls of one layer's attention per kernel and length, and two calls
in all for a kernel far slower than the other (``DROPPED``).

Choices are cached in ``$LLMRUN_HOME/tuning/attention.json`` under a key of CPU model, threads,
torch version, dtype and head shape; ``llmrun peaks --refresh`` forgets them (``tuning.forget``).
``LLMRUN_PREFILL_ATTENTION=sdpa|blocked`` forces a kernel; off the CPU prefill always takes SDPA.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from llmrun.devices import cpu_model_name
from llmrun.jsonfiles import read_cache, write_json_atomic
from llmrun.model.attention import PREFILL_KERNELS, attend, forced_prefill_attention
from llmrun.model.transformer import Attention, Transformer
from llmrun.paths import llmrun_home
from llmrun.profiler.timers import BUSY_CHOICES, BUSY_SOURCE, OtherLoad

PROMPT_LENS = (256, 1024)  # prompt lengths (tokens) the two kernels are timed at
REPEATS = 3  # timed calls per kernel and length (after an untimed one)
DROPPED = 3.0  # a kernel whose first timed call takes this many times the fastest's is timed no further
CACHE_VERSION = 1

Measure = Callable[[Attention, torch.dtype, list[str]], dict[str, list[float]]]
"""(a layer's attention, dtype, kernel names) -> median seconds of one call per kernel, one per ``PROMPT_LENS``
(fewer for a kernel dropped before the last length)."""


@dataclass
class AttentionChoice:
    """The kernel CPU prefill attends with and why: ``measured`` now, ``cached`` from an earlier
    measurement, ``BUSY_SOURCE`` (measured now on a busy CPU, so not cached), or
    ``LLMRUN_PREFILL_ATTENTION``; ``seconds`` per candidate (one layer's attention at each of
    ``prompt_lens`` tokens) when measured."""

    kernel: str
    source: str
    seconds: dict[str, list[float]] = field(default_factory=dict)
    prompt_lens: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        """The choice as plain JSON types (bench and profile reports carry it)."""
        return asdict(self)


def choose_prefill_attention(
    model: Transformer, *, refresh: bool = False, measure: Measure | None = None
) -> AttentionChoice:
    """The prefill attention kernel for ``model`` on the CPU: ``LLMRUN_PREFILL_ATTENTION`` when set to a
    kernel, else the cached measurement, else a measurement now (cached for next time)."""
    forced = forced_prefill_attention()
    if forced is not None:
        return AttentionChoice(forced, "LLMRUN_PREFILL_ATTENTION")
    attention = model.model.layers[0].self_attn
    dtype = model.model.norm.weight.dtype  # the activations' dtype, whatever form the matrices take
    key = _key(attention, dtype)
    if key in BUSY_CHOICES and not refresh:  # measured busy earlier in this process
        return BUSY_CHOICES[key]
    cache = read_cache(cache_path())
    entry = cache.get(key) if cache.get("version") == CACHE_VERSION and not refresh else None
    if isinstance(entry, dict) and entry.get("kernel") in PREFILL_KERNELS:
        return AttentionChoice(entry["kernel"], "cached", entry.get("seconds", {}), entry.get("prompt_lens", []))
    with OtherLoad() as load:
        seconds = (measure or measure_kernels)(attention, dtype, list(PREFILL_KERNELS))
    finished = [name for name in seconds if len(seconds[name]) == len(PROMPT_LENS)]  # the rest were dropped
    kernel = min(finished, key=lambda name: sum(seconds[name]))
    measured = {"kernel": kernel, "seconds": seconds, "prompt_lens": list(PROMPT_LENS)}
    if load.busy:  # timings of a busier machine than the next run's: used in this process, measured again then
        BUSY_CHOICES[key] = AttentionChoice(**measured, source=BUSY_SOURCE)
        return BUSY_CHOICES[key]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json_atomic(cache_path(), {**cache, "version": CACHE_VERSION, key: {**measured, "measured_at": stamp}})
    return AttentionChoice(**measured, source="measured")


def tune_prefill_attention(model: Transformer) -> AttentionChoice | None:
    """Give a CPU model the prefill attention kernel measured fastest for it (``model.prefill_attention``);
    None off the CPU, where prefill keeps SDPA.

    The first measurement of a head shape shows a status line on a terminal's stderr; later runs read the cache.
    """
    if model.model.norm.weight.device.type != "cpu":
        return None
    from rich.console import Console

    with Console(stderr=True).status("measuring the CPU prefill attention (once; cached)", spinner="dots"):
        choice = choose_prefill_attention(model)
    model.prefill_attention = choice.kernel
    return choice


def cache_path() -> Path:
    """Where measured prefill attention choices are kept."""
    return llmrun_home() / "tuning" / "attention.json"


def measure_kernels(attention: Attention, dtype: torch.dtype, kernels: list[str]) -> dict[str, list[float]]:
    """Median seconds of one causal attention call per kernel at each of ``PROMPT_LENS`` tokens, on random
    q (1, H, T, D) and k, v (1, Hkv, T, D) of ``attention``'s head shape in ``dtype``, on the CPU, without a
    sliding window (with one, the blocked kernel multiplies only the keys in it and SDPA still all of them).

    At each length every kernel runs once untimed (warm-up) and once timed; a kernel whose timed call
    takes over ``DROPPED`` times the fastest one's is out, with that one time as its last entry, so a
    kernel far slower on this CPU costs two calls, not the whole measurement. The others run
    ``REPEATS`` timed calls in all.
    """
    gen = torch.Generator().manual_seed(0)
    seconds: dict[str, list[float]] = {kernel: [] for kernel in kernels}
    racing = list(kernels)
    with torch.inference_mode():
        for t in PROMPT_LENS:
            q = torch.randn(1, attention.n_heads, t, attention.head_dim, generator=gen).to(dtype)
            k, v = (torch.randn(1, attention.n_kv_heads, t, attention.head_dim, generator=gen).to(dtype) for _ in "kv")
            runs = {kernel: functools.partial(attend, q, k, v, 0, None, kernel=kernel) for kernel in racing}
            for run in runs.values():
                run()  # warm-up, untimed
            first = {kernel: seconds_of(run) for kernel, run in runs.items()}
            kept = {kernel: once <= DROPPED * min(first.values()) for kernel, once in first.items()}
            for kernel, run in runs.items():
                more = [seconds_of(run) for _ in range(REPEATS - 1)] if kept[kernel] else []
                seconds[kernel].append(statistics.median([first[kernel], *more]))
            racing = [kernel for kernel in racing if kept[kernel]]
    return seconds


def seconds_of(run: Callable[[], object]) -> float:
    """Wall seconds of one call of ``run`` on the CPU."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _key(attention: Attention, dtype: torch.dtype) -> str:
    """What a measurement depends on: the CPU, threads, torch, dtype and the head shape."""
    heads = f"{attention.n_heads}x{attention.n_kv_heads}x{attention.head_dim}"
    return f"{cpu_model_name()}|{torch.get_num_threads()} threads|torch {torch.__version__}|{dtype}|heads {heads}"
