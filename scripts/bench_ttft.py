"""Time from process start to the first generated token of ``llmrun generate``, median of fresh processes.

Usage: python scripts/bench_ttft.py [--runs 5] [--threads 2] [--dtype fp32] [-- extra generate flags]

Each run starts ``python -m llmrun generate PROMPT --max-new-tokens 2 --temperature 0 --no-chat``
in a new process and stops the clock when its stdout shows the first character of generated text
(the command streams text as tokens arrive). That covers interpreter start, imports (torch is most
of it), model resolution, the memory-mapped load, tokenization, prefill and the first sample. The
model must already be imported (run ``llmrun generate`` once). ``--json`` in the extra flags is
not allowed: it prints only at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def first_token_seconds(argv: list[str], env: dict[str, str]) -> float:
    """Seconds from spawning ``argv`` until its stdout yields a first non-space character."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    try:
        while True:
            char = proc.stdout.read(1)
            if not char:
                raise RuntimeError(f"{' '.join(argv)} printed nothing (exit {proc.wait()})")
            if not char.isspace():
                return time.perf_counter() - t0
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("extra", nargs="*", help="more llmrun generate flags (after --)")
    args = parser.parse_args()
    argv = [
        sys.executable,
        "-m",
        "llmrun",
        "generate",
        args.prompt,
        "--max-new-tokens",
        "2",
        "--temperature",
        "0",
        "--no-chat",
        "--device",
        "cpu",
        "--dtype",
        args.dtype,
        *args.extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    first_token_seconds(argv, env)  # warm the page cache: the weights' pages are then read from memory
    times = [first_token_seconds(argv, env) for _ in range(args.runs)]
    print(
        f"time to first token from process start: median {statistics.median(times):.3f} s "
        f"(min {min(times):.3f}, max {max(times):.3f}, {args.runs} runs, {args.dtype}, {args.threads} threads)"
    )


if __name__ == "__main__":
    main()
