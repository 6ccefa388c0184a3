"""Decode at batch 1 against its two floors, measured in one process, alternating, medians.

Usage: python scripts/bench_decode_floor.py [--dtypes fp32,bf16] [--threads 2] [--rounds 7] [--tokens 16]
                                            [--context 64] [--model MODEL_DIR]

Per dtype and round, in turn (the order rotates every round):

* ``kernel floor``: one pass of matrix-vector products over every weight matrix a decode step
  reads (fused q/k/v, o, gate/up, down per layer, and the lm_head), timed with every kernel of
  ``llmrun.profiler.kernel_floor.gemv_kernels`` in the round and the fastest kept: what no
  Python-level work around those kernels can beat;
* ``fast``: ``llmrun.model.executor.decode_step`` on its fast path (``llmrun.model.fastpath``);
* ``eager``: the same step through the eager layer loop (what the profiler times);
* ``DRAM floor``: the bytes of the weights a decode step reads (the cost model's
  ``decode_weight_bytes``: these matrices plus the norms and one embedding row) at the memory
  bandwidth measured in the same round (the better of a read-only ``sum`` and a ``copy``
  counting read + write, over 512 MiB);
* ``int8 floor`` (bf16 only, for information): the same pass with the weights quantized to int8
  per output row, through ``torch._weight_int8pack_mm`` with bf16 activations: what int8 weights
  would bring (another precision, so no ratio is taken against it).

Each figure is the median over rounds of seconds per token; ratios are taken within a round and
their median reported, so a busy neighbour slows both sides of a ratio alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from llmrun.devices import DTYPES
from llmrun.loading.loader import load_model
from llmrun.loading.sources import resolve_model
from llmrun.model.executor import decode_step, make_cache, prefill
from llmrun.profiler.costs import decode_weight_bytes
from llmrun.profiler.kernel_floor import decode_matrices, gemv_kernels
from llmrun.profiler.tuning import tune_decode


def bandwidth(buffer: torch.Tensor, scratch: torch.Tensor) -> float:
    """Bytes/s of main memory now: the better of one ``sum`` (read) and one ``copy_`` (read + write)."""
    t0 = time.perf_counter()
    buffer.sum()
    read = buffer.nbytes / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    scratch.copy_(buffer)
    copy = 2 * buffer.nbytes / (time.perf_counter() - t0)
    return max(read, copy)


def int8_pass(model, tokens: int):
    """Seconds per pass of int8 weight-only GEMVs (per-row scales, bf16 activations) over the decode weights."""
    mats = [w.float() for w in decode_matrices(model)]
    scales = [w.abs().amax(dim=1).clamp(min=1e-12) / 127 for w in mats]
    quantized = [torch.round(w / s[:, None]).to(torch.int8) for w, s in zip(mats, scales, strict=True)]
    scales = [s.to(torch.bfloat16) for s in scales]
    inputs = {k: torch.randn(1, k, dtype=torch.bfloat16) for k in {w.shape[1] for w in mats}}
    del mats

    def one_sample() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for _ in range(tokens):
                for w, s in zip(quantized, scales, strict=True):
                    torch._weight_int8pack_mm(inputs[w.shape[1]], w, s)
        return (time.perf_counter() - t0) / tokens

    return one_sample


def measure(model_dir: Path, dtype: str, args: argparse.Namespace) -> dict:
    model = load_model(model_dir, torch.device("cpu"), DTYPES[dtype], progress=False)
    tune_decode(model)  # the decode kernel measured fastest here, as the CLI does
    nbytes = decode_weight_bytes(model.args, DTYPES[dtype].itemsize)
    kernels = {name: build() for name, build in gemv_kernels(model, 1).items()}  # every copy at once
    context = args.context + args.tokens * (args.warmup + args.rounds) * 2 + 1
    caches = {"fast": make_cache(model, 1, context), "eager": make_cache(model, 1, context)}
    prompt = torch.randint(0, model.args.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(0))
    for cache in caches.values():
        prefill(model, prompt, cache)
    token = torch.tensor([1])
    big = torch.randn(512 * 2**20 // 4)
    scratch = torch.empty_like(big)

    def decode(path: str) -> float:
        t0 = time.perf_counter()
        for _ in range(args.tokens):
            decode_step(model, token, caches[path], fast=path == "fast", copy=False)
        return (time.perf_counter() - t0) / args.tokens

    best_kernel: dict[str, int] = {name: 0 for name in kernels}

    def floor() -> float:
        """Every kernel in turn; the fastest one's seconds per pass this round."""
        seconds = {}
        with torch.inference_mode():
            for name, one_pass in kernels.items():
                t0 = time.perf_counter()
                for _ in range(args.tokens):
                    one_pass()
                seconds[name] = (time.perf_counter() - t0) / args.tokens
        fastest = min(seconds, key=seconds.get)
        best_kernel[fastest] += 1
        return seconds[fastest]

    runners = {"kernel floor": floor, "fast": lambda: decode("fast"), "eager": lambda: decode("eager")}
    if dtype == "bf16" and hasattr(torch, "_weight_int8pack_mm"):
        runners["int8 floor"] = int8_pass(model, args.tokens)
    names = list(runners)
    samples: dict[str, list[float]] = {name: [] for name in [*names, "DRAM floor"]}
    for r in range(args.warmup + args.rounds):
        bw = bandwidth(big, scratch)
        rotated = names[r % len(names) :] + names[: r % len(names)]
        seconds = {name: runners[name]() for name in rotated}
        if r >= args.warmup:
            for name, s in seconds.items():
                samples[name].append(s)
            samples["DRAM floor"].append(nbytes / bw)
    median = {name: statistics.median(v) for name, v in samples.items()}
    ratio = {
        "fast / kernel floor (tok/s)": statistics.median(
            f / k for f, k in zip(samples["kernel floor"], samples["fast"], strict=True)
        ),
        "fast / DRAM floor (tok/s)": statistics.median(
            d / f for d, f in zip(samples["DRAM floor"], samples["fast"], strict=True)
        ),
        "fast / eager (tok/s)": statistics.median(
            e / f for f, e in zip(samples["fast"], samples["eager"], strict=True)
        ),
        "kernel floor / DRAM floor (tok/s)": statistics.median(
            d / k for d, k in zip(samples["DRAM floor"], samples["kernel floor"], strict=True)
        ),
    }
    return {
        "dtype": dtype,
        "kernel": max(best_kernel, key=best_kernel.get),
        "fastest_kernel_rounds": best_kernel,
        "weight_bytes": nbytes,
        "seconds_per_token": median,
        "tok_s": {name: 1 / s for name, s in median.items()},
        "ratios": ratio,
        "samples": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the default model)")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=16, help="decode steps (or floor passes) per sample")
    parser.add_argument("--context", type=int, default=64, help="prompt tokens in the cache before decoding")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model, progress=False)
    results = []
    for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        result = measure(model_dir, dtype, args)
        results.append(result)
        print(
            f"\n{dtype}: {result['weight_bytes'] / 1e6:.0f} MB of weights per token, {args.threads} threads, "
            f"median of {args.rounds} rounds of {args.tokens} tokens; kernel floor kernel: {result['kernel']}"
        )
        print("| path | ms/token | tok/s |")
        print("| --- | ---: | ---: |")
        for name, s in result["seconds_per_token"].items():
            print(f"| {name} | {s * 1e3:.2f} | {1 / s:.1f} |")
        for name, value in result["ratios"].items():
            print(f"{name}: {value:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
