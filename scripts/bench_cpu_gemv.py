"""The CPU decode step with each matrix-vector kernel choice, in one process, alternating, medians.

Usage: python scripts/bench_cpu_gemv.py [--dtypes fp32,bf16] [--kernels conv,packed] [--threads 2]
                                        [--rounds 9] [--tokens 16] [--context 64] [--model MODEL_DIR]
                                        [--call-overhead]

Per dtype, one ``llmrun.model.fastpath.CpuDecoder`` per kernel (``LLMRUN_CPU_GEMV``'s choices: conv,
packed, onednn, mm), all on the same model and KV cache after a prompt of ``--context`` random
tokens. Each round, every decoder runs ``--tokens`` steps at the same positions (the order
rotates every round); a decoder rewrites the cache slots the previous one wrote, with the same
K/V. Reported: the median ms per step of each kernel and, per round, its time over the first
kernel's, median over rounds (< 1: faster than the first). The default model unless ``--model``.

``--call-overhead`` also times one product with each kernel on a 16x16 matrix (what a call costs
before any real work), median of 5 samples of 2000 calls.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llmrun.devices import DTYPES
from llmrun.loading.loader import load_model
from llmrun.loading.sources import resolve_model
from llmrun.model.executor import make_cache, prefill
from llmrun.model.fastpath import CpuDecoder
from llmrun.model.fastpath.gemv import PRODUCTS, cpu_gemv


def measure(model_dir, dtype: str, kernels: list[str], args: argparse.Namespace) -> dict[str, list[float]]:
    """Seconds per step of each kernel, one sample per round."""
    model = load_model(model_dir, torch.device("cpu"), DTYPES[dtype], progress=False)
    cache = make_cache(model, 1, args.context + args.tokens)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.args.vocab_size, (1, args.context), generator=generator)
    token = torch.tensor([prompt[0, -1].item()])
    samples: dict[str, list[float]] = {kernel: [] for kernel in kernels}
    with torch.inference_mode():
        prefill(model, prompt, cache)
        decoders = {kernel: CpuDecoder(model, cache, gemv=kernel) for kernel in kernels}
        for decoder in decoders.values():  # warm-up
            cache.trim(args.context)
            for _ in range(args.tokens):
                decoder.step(token)
        for round_ in range(args.rounds):
            order = kernels[round_ % len(kernels) :] + kernels[: round_ % len(kernels)]
            for kernel in order:
                cache.trim(args.context)
                t0 = time.perf_counter()
                for _ in range(args.tokens):
                    decoders[kernel].step(token)
                samples[kernel].append((time.perf_counter() - t0) / args.tokens)
    return samples


def call_overhead(dtype: str, kernels: list[str]) -> dict[str, float]:
    """Seconds per ``accumulate`` of a (1, 16) x (16, 16) product, per kernel that runs ``dtype`` here."""
    torch_dtype = DTYPES[dtype]
    w, x = torch.randn(16, 16, dtype=torch_dtype), torch.randn(1, 16, dtype=torch_dtype)
    acc = torch.zeros(1, 16, dtype=torch_dtype)
    seconds = {}
    with torch.inference_mode():
        for kernel in dict.fromkeys(cpu_gemv(torch_dtype, k) for k in kernels):
            products = PRODUCTS[kernel](1)
            packed = products.pack(w)
            products.keep(x, acc)
            samples = []
            for _ in range(6):  # the first is warm-up
                t0 = time.perf_counter()
                for _ in range(2000):
                    products.accumulate(acc, x, packed, None)
                samples.append((time.perf_counter() - t0) / 2000)
            seconds[kernel] = statistics.median(samples[1:])
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the default model)")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--kernels", default="conv,packed", help="LLMRUN_CPU_GEMV choices; the first is the base")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--tokens", type=int, default=16, help="decode steps per sample")
    parser.add_argument("--context", type=int, default=64, help="prompt tokens in the cache before decoding")
    parser.add_argument("--call-overhead", action="store_true", help="also time each kernel on a 16x16 product")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model, progress=False)
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        samples = measure(model_dir, dtype, kernels, args)
        base = samples[kernels[0]]
        print(f"\n{dtype}, {args.threads} threads, median of {args.rounds} rounds of {args.tokens} steps")
        print(f"| kernel | ms/step | time ÷ {kernels[0]} |")
        print("| --- | ---: | ---: |")
        for kernel, times in samples.items():
            ratio = statistics.median(t / b for t, b in zip(times, base, strict=True))
            print(f"| {kernel} | {statistics.median(times) * 1e3:.2f} | {ratio:.3f} |")
        if args.call_overhead:
            costs = ", ".join(f"{k} {s * 1e6:.1f} µs" for k, s in call_overhead(dtype, kernels).items())
            print(f"one 16x16 product: {costs}")


if __name__ == "__main__":
    main()
