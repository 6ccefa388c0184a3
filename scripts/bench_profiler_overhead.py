"""Overhead of the profiler on decode: the same eager decode steps with the op timers off and on.

"Off" is the executor's eager path with a probe that records nothing (the hooks are called, as
they always are in prefill); "on" is ``OpTimer`` with its per-step bookkeeping. Steps alternate
off, on, off, on, ... (each round starts with the other one), so that a noisy neighbour hits both
alike; the figure is the median over adjacent (off, on) pairs of on/off, minus 1. The medians of
all off and all on steps are printed too. The cost of the hooks themselves when off is measured
apart: one no-op region per named op.

Usage:

    python scripts/bench_profiler_overhead.py                     # SmolLM2-135M-Instruct, fp32, CPU
    python scripts/bench_profiler_overhead.py --rounds 20 --steps 32 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from llmrun.devices import resolve_device, resolve_dtype, synchronize
from llmrun.loading.loader import load_model
from llmrun.loading.sources import resolve_model
from llmrun.model.executor import decode_step, make_cache, prefill
from llmrun.model.probe import NULL_PROBE, Probe
from llmrun.profiler.timers import OpTimer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model spec (default: the default model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32, help="decode steps per round (off and on alternate)")
    parser.add_argument("--rounds", type=int, default=8, help="rounds, each from the prompt's end again")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    opts = parser.parse_args()

    torch.set_num_threads(opts.threads)
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    model = load_model(resolve_model(opts.model, progress=False), device, dtype, progress=False)
    cache = make_cache(model, 1, opts.prompt_len + opts.steps)
    tokens = torch.randint(0, model.args.vocab_size, (1, opts.prompt_len), generator=torch.Generator().manual_seed(0))
    first = prefill(model, tokens.to(device), cache).argmax(-1)
    hooks_only, timer = Probe(), OpTimer(device)

    def one_round(first_on: bool) -> list[tuple[bool, float]]:
        """(profiled, seconds) of each of --steps decode steps, alternating off and on."""
        token, times = first, []
        for j in range(opts.steps):
            profiled = (j % 2 == 0) == first_on
            synchronize(device)
            t0 = time.perf_counter()
            if profiled:
                with timer.step():
                    token = decode_step(model, token, cache, timer).argmax(-1)
            else:
                token = decode_step(model, token, cache, hooks_only).argmax(-1)
            synchronize(device)
            times.append((profiled, time.perf_counter() - t0))
        timer.reset()
        return times

    one_round(False)  # warm-up
    steps = [step for r in range(opts.rounds) for step in one_round(r % 2 == 1)]
    ratios = [
        (b if on_b else a) / (a if on_b else b)
        for (on_a, a), (on_b, b) in zip(steps[::2], steps[1::2], strict=False)
        if on_a != on_b
    ]
    off = [t for on_, t in steps if not on_]
    on = [t for on_, t in steps if on_]
    regions = model.args.num_hidden_layers * 11 + 4
    null_s = _null_region_seconds(regions)
    result = {
        "model": opts.model or "HuggingFaceTB/SmolLM2-135M-Instruct",
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": opts.threads,
        "prompt_len": opts.prompt_len,
        "steps_per_round": opts.steps,
        "rounds": opts.rounds,
        "off_step_s": statistics.median(off),
        "on_step_s": statistics.median(on),
        "overhead": statistics.median(ratios) - 1,
        "pairs": len(ratios),
        "null_hooks_per_step_s": null_s,
        "null_hooks_fraction": null_s / statistics.median(off),
    }
    if opts.json:
        print(json.dumps(result))
    else:
        print(
            f"decode step, profiler off {result['off_step_s'] * 1e3:.2f} ms, on {result['on_step_s'] * 1e3:.2f} ms: "
            f"overhead {result['overhead']:+.1%} (median of {len(ratios)} adjacent off/on pairs); "
            f"hooks when off: {null_s * 1e6:.1f} us per step ({result['null_hooks_fraction']:.3%})"
        )
    return 0


def _null_region_seconds(regions: int, repeats: int = 200) -> float:
    """Seconds that ``regions`` no-op ``NULL_PROBE.region`` blocks take (the cost of the hooks when off)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(regions):
            with NULL_PROBE.region("qkv_proj", 0):
                pass
        best = min(best, time.perf_counter() - t0)
    return best


if __name__ == "__main__":
    sys.exit(main())
