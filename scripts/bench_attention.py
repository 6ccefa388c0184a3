"""CPU attention choices, each against its alternative in one process, alternating, medians.

Usage: python scripts/bench_attention.py [--threads 2] [--rounds 5] [--prefill 512,2048] [--contexts 64,2048,6000]
                                         [--dtypes bf16,fp32] [--model MODEL_DIR]

Two measurements on the default model (or ``--model``), each where llmrun makes the choice:

* ``prefill`` (every dtype): one prefill of N random tokens from an empty cache with
  ``llmrun.model.attention.blocked_attention`` and with SDPA (``Transformer.prefill_attention`` set to
  each; the line above the table says which of the two ``llmrun.profiler.attention_tuning`` measured
  faster here, the one prefill takes);
* fp32 ``decode``: 12 fast-path decode steps continuing a prompt of C tokens, with attention over 256+
  keys on all threads (``llmrun.model.fastpath.cpu.WIDE_ATTENTION_KEYS``, the default) and with attention always
  on one thread (bf16 decode attention always runs on one); the two take turns on the same cache, so
  the context grows by 24 tokens a round.

Each round runs both variants; the ratio is taken within the round and its median printed
(> 1: the first is faster: blocked in the prefill rows, the default in the decode rows).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
import unittest.mock

import torch

import llmrun.model.fastpath.cpu
from llmrun.devices import DTYPES
from llmrun.loading.loader import load_model
from llmrun.loading.sources import resolve_model
from llmrun.model.executor import decode_step, make_cache, prefill
from llmrun.profiler.tuning import tune_decode


def prefill_seconds(model, n: int) -> float:
    tokens = torch.randint(0, model.args.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
    cache = make_cache(model, 1, n)
    t0 = time.perf_counter()
    prefill(model, tokens, cache)
    return time.perf_counter() - t0


class Decoder:
    """Fast-path decode steps continuing one prompt of ``context`` tokens (prefilled once)."""

    def __init__(self, model, context: int, room: int) -> None:
        self.model = model
        self.cache = make_cache(model, 1, context + room)
        prefill(model, torch.randint(0, model.args.vocab_size, (1, context)), self.cache)
        self.token = torch.tensor([1])

    def seconds(self, steps: int = 12) -> float:
        """Seconds per step over the next ``steps`` positions."""
        t0 = time.perf_counter()
        for _ in range(steps):
            decode_step(self.model, self.token, self.cache, copy=False)
        return (time.perf_counter() - t0) / steps


def patched(fn, module, name: str, value):
    """``fn`` run with ``module.name`` set to ``value`` (restored after each call)."""

    def run():
        with unittest.mock.patch.object(module, name, value):
            return fn()

    return run


def with_attention(fn, model, kernel: str):
    """``fn`` run with ``model.prefill_attention`` set to ``kernel`` (restored after each call)."""

    def run():
        before = model.prefill_attention
        model.prefill_attention = kernel
        try:
            return fn()
        finally:
            model.prefill_attention = before

    return run


def compare(name: str, default, alternative, rounds: int) -> None:
    """Alternate the two (rotating which goes first), print medians and the median ratio."""
    a, b = [], []
    for r in range(rounds + 1):  # the first round warms up
        pair = [(default, a), (alternative, b)]
        for fn, out in pair if r % 2 else reversed(pair):
            seconds = fn()
            if r:
                out.append(seconds)
    ratio = statistics.median(y / x for x, y in zip(a, b, strict=True))
    print(f"| {name} | {statistics.median(a) * 1e3:.1f} | {statistics.median(b) * 1e3:.1f} | {ratio:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prefill", default="512,2048", help="prompt lengths for the prefill comparison")
    parser.add_argument("--contexts", default="64,2048,6000", help="decode prompt lengths ('': none)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model, progress=False)
    for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        model = load_model(model_dir, torch.device("cpu"), DTYPES[dtype], progress=False)
        tune_decode(model)  # the decode kernel and prefill attention measured fastest here, as the CLI does
        print(f"\n{dtype}, {args.threads} threads, medians of {args.rounds} rounds")
        print(f"prefill attention measured fastest here: {model.prefill_attention}")
        print("| test | first ms | alternative ms | alternative ÷ first |")
        print("| --- | ---: | ---: | ---: |")
        for n in [int(x) for x in args.prefill.split(",") if x]:
            run = functools.partial(prefill_seconds, model, n)
            blocked, sdpa = (with_attention(run, model, kernel) for kernel in ("blocked", "sdpa"))
            compare(f"prefill {n}: blocked vs SDPA", blocked, sdpa, args.rounds)
        for context in [int(x) for x in args.contexts.split(",") if x] if dtype == "fp32" else []:
            decoder = Decoder(model, context, room=24 * (args.rounds + 1) + 1)
            run = decoder.seconds
            alternative = patched(run, llmrun.model.fastpath.cpu, "WIDE_ATTENTION_KEYS", 1 << 30)
            compare(f"decode at {context}: wide vs 1-thread attention", run, alternative, args.rounds)


if __name__ == "__main__":
    main()
