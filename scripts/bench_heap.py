"""Prefill with the C heap keeping freed blocks (what the CLI does) against glibc's defaults, alternating.

Usage: python scripts/bench_heap.py [--rounds 5] [--prompt-len 512] [--threads 2] [--quant none] [--model M]

Each round starts two fresh processes, one per heap policy, in an order that rotates every round;
each loads the model, runs one unmeasured prefill (first touch of every page), then times
``--repeats`` prefills of ``--prompt-len`` random tokens and counts the minor page faults they
take (``getrusage``). The figures are medians over rounds of each process's median prefill; the
ratio is taken within a round. ``kept`` is ``llmrun.allocator.keep_freed_memory`` (called by
``llmrun``'s CLI at start); ``system`` leaves glibc's dynamic mmap threshold and trimming as they are.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

WORKER = """
import json, resource, statistics, sys, time
import torch
from llmrun.allocator import keep_freed_memory
policy, model, quant, threads, prompt_len, repeats = sys.argv[1:7]
if policy == "kept":
    keep_freed_memory()
torch.set_num_threads(int(threads))
from llmrun.loading.session import open_session
from llmrun.model.executor import make_cache, prefill
from llmrun.profiler.tuning import tune_decode
session = open_session(model or None, "cpu", "auto", with_tokenizer=False, quant=quant)
tune_decode(session.model)
tokens = torch.randint(0, session.model.args.vocab_size, (1, int(prompt_len)))
cache = make_cache(session.model, 1, int(prompt_len))
seconds, faults = [], []
with torch.inference_mode():
    for i in range(int(repeats) + 1):
        cache.reset()
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        prefill(session.model, tokens, cache)
        if i:  # the first prefill touches every page for the first time under either policy
            seconds.append(time.perf_counter() - t0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps({"seconds": statistics.median(seconds), "faults": statistics.median(faults)}))
"""


def run_worker(policy: str, args: argparse.Namespace) -> dict:
    """One fresh process with ``policy``: its median prefill seconds and minor page faults."""
    argv = [policy, args.model, args.quant, str(args.threads), str(args.prompt_len), str(args.repeats)]
    done = subprocess.run([sys.executable, "-c", WORKER, *argv], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5, help="timed prefills per process")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quant", default="none", help="as llmrun's --quant (default: the float import)")
    parser.add_argument("--model", default="", help="as llmrun's --model (default: SmolLM2-135M-Instruct)")
    args = parser.parse_args()
    policies = ["kept", "system"]
    samples: dict[str, list[dict]] = {p: [] for p in policies}
    ratios = []
    for r in range(args.rounds):
        order = policies if r % 2 == 0 else policies[::-1]
        round_ = {p: run_worker(p, args) for p in order}
        for p in policies:
            samples[p].append(round_[p])
        ratios.append(round_["system"]["seconds"] / round_["kept"]["seconds"])
        print(f"round {r + 1}: " + ", ".join(f"{p} {round_[p]['seconds'] * 1e3:.1f} ms" for p in policies), flush=True)
    print(f"prefill {args.prompt_len} tokens, {args.threads} threads, median of {args.rounds} rounds:")
    for p in policies:
        ms = statistics.median(s["seconds"] for s in samples[p]) * 1e3
        faults = statistics.median(s["faults"] for s in samples[p])
        rate = args.prompt_len / ms * 1e3
        print(f"  {p:6s} {ms:8.1f} ms  {rate:7.1f} tok/s  {faults:8.0f} minor page faults per prefill")
    print(f"  system / kept time: {statistics.median(ratios):.3f} (median of the rounds' ratios)")


if __name__ == "__main__":
    main()
