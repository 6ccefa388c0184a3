"""Generate up to the model's full context window and check that it ends with finish_reason ``context``.

Usage:

    python scripts/full_context.py                        # the default model (SmolLM2, 8192 tokens)
    python scripts/full_context.py --model DIR --device cuda --max-new-tokens 9000

It runs ``python -m llmrun generate PROMPT --ignore-eos --max-new-tokens N --json`` with N larger than
the context, so the run must stop at the context end, not at the token budget, and checks: exit code 0,
``finish_reason == "context"``, ``prompt_tokens + generated_tokens`` equal to the model's context length,
and only the statistics line (no error) on stderr. It prints the run's numbers and exits 1 if a check
fails. A benchmark, not a CI test: on a CPU the default model takes tens of minutes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from llmrun.loading.loader import read_model_args


def main() -> int:
    """Run the generation, check it, print the numbers; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model spec as for llmrun --model (default: the default model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--prompt", default="Tell me a very long story about a lighthouse keeper.")
    parser.add_argument("--max-new-tokens", type=int, default=9000)
    args = parser.parse_args()

    command = [sys.executable, "-m", "llmrun", "generate", args.prompt, "--ignore-eos", "--json"]
    command += ["--max-new-tokens", str(args.max_new_tokens), "--device", args.device, "--dtype", args.dtype]
    command += ["--temperature", "0.8", "--seed", "0"]
    if args.model:
        command += ["--model", args.model]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(f"FAIL: exit code {proc.returncode}\n{proc.stderr}", file=sys.stderr)
        return 1
    result = json.loads(proc.stdout)
    context = read_model_args(Path(result["model_dir"]) / "config.json").context_length
    total = result["prompt_tokens"] + result["generated_tokens"]
    print(
        f"model {result['model']} on {result['device']} ({result['dtype']}), context {context} tokens: "
        f"prompt {result['prompt_tokens']} + generated {result['generated_tokens']} = {total} tokens, "
        f"finish_reason {result['finish_reason']}, prefill {result['prefill_tok_s']:.1f} tok/s, "
        f"decode {result['decode_tok_s']:.1f} tok/s, wall {wall:.1f} s"
    )
    failures = []
    if result["finish_reason"] != "context":
        failures.append(f"finish_reason is {result['finish_reason']!r}, not 'context'")
    if total != context:
        failures.append(f"prompt + generated is {total} tokens, not the context length {context}")
    if args.max_new_tokens + result["prompt_tokens"] <= context:
        failures.append(f"--max-new-tokens {args.max_new_tokens} does not reach past the context; use more")
    if "error" in proc.stderr or len(proc.stderr.strip().splitlines()) > 1:
        failures.append(f"unexpected stderr: {proc.stderr.strip()}")
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
