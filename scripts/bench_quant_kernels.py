"""Whole decode steps of a quantized model with each quantized kernel in turn, alternating: ms per step and ratios.

Usage: python scripts/bench_quant_kernels.py [--quant auto|int8|int4] [--kernels native-tiled,native-x16]
                                             [--rounds 15] [--steps 24] [--threads 2]

Loads the default model once (``--quant auto``: the Q4_1 GGUF as stored; ``int8``/``int4``: the float
import quantized at load) and, per round, sets every quantized weight that a kernel of ``--kernels``
takes to it (``llmrun.model.quant.KERNELS``; the others keep the first they take; no tuning, which
would free the stored scales that the kernels not chosen need), then times
``--steps`` decode steps of a fast decoder over a cache prefilled with the same 64 random tokens.
The kernels' order alternates by round; the figures are the medians over rounds of the seconds per
step, and the median of the rounds' ratios to the first kernel.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from llmrun.devices import cpu_model_name
from llmrun.loading.session import open_session
from llmrun.model.executor import make_cache, prefill
from llmrun.model.fastpath import CpuDecoder
from llmrun.model.quant import KERNELS, product_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quant", default="auto", choices=["auto", "int8", "int4"])
    parser.add_argument("--kernels", default="native-tiled,native-x16")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    names = args.kernels.split(",")
    unknown = [name for name in names if name not in KERNELS]
    if unknown:
        raise SystemExit(f"unknown kernels {unknown}: choose among {sorted(KERNELS)}")
    torch.set_num_threads(args.threads)
    session = open_session(None, dtype="fp32", quant=args.quant)
    model = session.model  # untuned: every weight keeps its stored scales, so that every kernel takes it
    weights = list(product_weights(model))
    prompt = torch.randint(0, model.args.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    cache = make_cache(model, 1, 64 + args.steps + 1)
    token = torch.tensor([1])
    samples: dict[str, list[float]] = {name: [] for name in names}
    weights_taken: dict[str, int] = {}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else reversed(names):
            for weight in weights:
                if KERNELS[name].accepts(weight, weight.dtype):
                    weight.kernel = name
            taken = sum(weight.kernel == name for weight in weights)
            cache.reset()
            prefill(model, prompt, cache)
            decoder = CpuDecoder(model, cache)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                decoder.step(token)
            samples[name].append((time.perf_counter() - t0) / args.steps)
            weights_taken[name] = taken
    first = samples[names[0]]
    ratios = {name: statistics.median(a / b for a, b in zip(first, v, strict=True)) for name, v in samples.items()}
    result = {
        "cpu": cpu_model_name(),
        "threads": args.threads,
        "quant": args.quant,
        "weights": len(weights),
        "weights_taken": weights_taken,
        "ms_per_step": {name: round(statistics.median(v) * 1e3, 2) for name, v in samples.items()},
        f"{names[0]} / kernel (time)": {name: round(ratio, 3) for name, ratio in ratios.items()},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
