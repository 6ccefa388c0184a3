"""The float32 CPU decode step with its small ops as native calls against the same step on PyTorch ops.

Usage: python scripts/bench_fused_ops.py [--quant auto|none] [--baseline pytorch|op-by-op] [--rounds 7]
                                         [--steps 24] [--threads 2]

Loads the default model once (``--quant auto``: the Q4_1 GGUF run quantized; ``none``: float32),
tunes it as ``generate`` does, and builds two CPU decoders over two caches prefilled with the same
64 random tokens: one as ``generate`` runs it (``llmrun.model.fastpath.cpu.CpuDecoder``: RMSNorm, SiLU·mul,
RoPE and attention as native calls, each block one native call where all its products are native),
and a baseline: ``pytorch``, PyTorch's ops for all of those; ``op-by-op``, the same native ops called
one by one from Python (``native_layers`` emptied).
Each round times ``--steps`` decode steps of each, the order alternating by round; the figures are
the medians over rounds of the seconds per step, and the median of the rounds' ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from llmrun.devices import cpu_model_name
from llmrun.loading.loader import load_model
from llmrun.loading.sources import resolve_model
from llmrun.model.executor import make_cache, prefill
from llmrun.model.fastpath import CpuDecoder
from llmrun.profiler.tuning import tune_decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quant", choices=["auto", "none"], default="auto")
    parser.add_argument("--baseline", choices=["pytorch", "op-by-op"], default="pytorch")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = resolve_model(None, progress=False, quantized=args.quant == "auto")
    model = load_model(model_dir, torch.device("cpu"), torch.float32, progress=False)
    tune_decode(model)
    prompt = torch.randint(0, model.args.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    decoders = {}
    for fused in (True, False):
        cache = make_cache(model, 1, 64 + args.rounds * args.steps + 1)
        prefill(model, prompt, cache)
        decoder = CpuDecoder(model, cache)
        if not fused:
            decoder.native_layers = []
            if args.baseline == "pytorch":
                decoder.fused_ops, decoder.native_attention = False, {}
        decoders["fused" if fused else args.baseline] = decoder
    if not decoders["fused"].fused_ops:
        raise SystemExit("the native kernels are not built here: nothing to compare")
    if args.baseline == "op-by-op" and not decoders["fused"].native_layers:
        raise SystemExit("the blocks are not native here (a product not native): nothing to compare")
    token = torch.tensor([1])
    samples: dict[str, list[float]] = {name: [] for name in decoders}
    for r in range(args.rounds):
        order = list(decoders) if r % 2 == 0 else list(reversed(decoders))
        for name in order:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                decoders[name].step(token)
            samples[name].append((time.perf_counter() - t0) / args.steps)
    ratio = statistics.median(p / f for f, p in zip(samples["fused"], samples[args.baseline], strict=True))
    result = {
        "cpu": cpu_model_name(),
        "threads": args.threads,
        "quant": args.quant,
        "ms_per_step": {name: round(statistics.median(v) * 1e3, 2) for name, v in samples.items()},
        f"{args.baseline} / fused (time)": round(ratio, 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
