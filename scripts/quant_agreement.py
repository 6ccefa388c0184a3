"""Greedy output of a GGUF run quantized (``--quant auto``) against the same file dequantized (``--quant none``).

Usage: python scripts/quant_agreement.py [--model SPEC] [-n 32] [--dtype auto] [--no-tune] [--kernel NAME]
                                         [--json-only]

Each prompt shipped below goes through the model's chat template as ``llmrun generate`` applies it
and decodes ``-n`` new tokens at temperature 0 (stopping at an end-of-sequence id, as ``generate``
does), once with the quantized weights and once with the dequantized ones. Each model is loaded
once (one after the other, in this process) and tuned as ``generate`` tunes it (``--no-tune``:
the default kernels, which compute in the model's dtype; the tuned ones may cast to bf16; ``--kernel``:
that kernel of ``llmrun.model.quant.KERNELS`` on every quantized weight it takes, untuned). Prints a table
(per prompt: equal or not, the common prefix in tokens, both lengths) and a JSON summary: how many
prompts give equal token sequences and the mean common prefix.
"""

from __future__ import annotations

import argparse
import gc
import json

import torch

from llmrun.generation.generate import generate_tokens
from llmrun.generation.prompt import PromptSettings, prompt_ids
from llmrun.generation.sampling import Sampler, SamplingParams
from llmrun.loading.session import open_session
from llmrun.model.quant import KERNELS, product_weights
from llmrun.profiler.tuning import tune_decode

PROMPTS = (
    "The capital of France is",
    "What is 17 times 23?",
    "Write a haiku about autumn leaves.",
    "Explain photosynthesis in one sentence.",
    "List three uses of a paperclip.",
    "Translate 'good morning' into Spanish.",
    "Who wrote Romeo and Juliet?",
    "Give me a short tip for sleeping better.",
    "What does a CPU cache do?",
    "Write a Python function that reverses a string.",
    "Why is the sky blue?",
    "Name the planets of the solar system.",
    "Summarize the plot of Cinderella in two sentences.",
    "What is the boiling point of water at sea level?",
    "Suggest a name for a black cat.",
    "How do I make a cup of tea?",
    "What is the difference between weather and climate?",
    "Tell me a fun fact about octopuses.",
    "Convert 5 kilometres to miles.",
    "Write the opening line of a mystery novel.",
)


def greedy_outputs(
    model_spec: str | None, quant: str, dtype: str, new_tokens: int, tune: bool, kernel: str | None = None
) -> list[list[int]]:
    """The generated ids of every prompt of ``PROMPTS`` with the weights loaded as ``quant`` (and run through
    ``kernel`` where it takes them, untuned)."""
    session = open_session(model_spec, dtype=dtype, quant=quant)
    if kernel is not None:
        for weight in product_weights(session.model):
            if KERNELS[kernel].accepts(weight, weight.dtype):
                weight.kernel = kernel
    elif tune:
        tune_decode(session.model)
    context = session.model.args.context_length
    outputs = []
    for text in PROMPTS:
        ids = prompt_ids(session.tokenizer, text, PromptSettings(), context, session.name, new_tokens)
        sampler = Sampler(SamplingParams(temperature=0.0, seed=0), session.device)
        tokens = generate_tokens(
            session.model, ids, sampler, max_new_tokens=new_tokens, stop_ids=session.tokenizer.eos_ids
        )
        outputs.append(list(tokens))
    del session
    gc.collect()
    return outputs


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids ``a`` and ``b`` share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a .gguf file or --model spec (default: the default model)")
    parser.add_argument("-n", "--new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--no-tune", action="store_true", help="keep the default kernels (no measured choice)")
    parser.add_argument("--kernel", choices=sorted(KERNELS), help="run the quantized weights through this kernel")
    parser.add_argument("--json-only", action="store_true", help="print only the JSON summary")
    args = parser.parse_args()
    with torch.inference_mode():
        quantized = greedy_outputs(args.model, "auto", args.dtype, args.new_tokens, not args.no_tune, args.kernel)
        dequantized = greedy_outputs(args.model, "none", args.dtype, args.new_tokens, not args.no_tune)
    prefixes = [common_prefix(q, d) for q, d in zip(quantized, dequantized, strict=True)]
    equal = [q == d for q, d in zip(quantized, dequantized, strict=True)]
    if not args.json_only:
        print(f"{'#':>2}  {'equal':5}  {'prefix':>6}  {'quant':>5}  {'float':>5}  prompt")
        for i, text in enumerate(PROMPTS):
            lengths = f"{len(quantized[i]):>5}  {len(dequantized[i]):>5}"
            print(f"{i:>2}  {str(equal[i]):5}  {prefixes[i]:>6}  {lengths}  {text}")
    summary = {
        "model": args.model or "default",
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "tuned": not args.no_tune and args.kernel is None,
        "kernel": args.kernel,
        "prompts": len(PROMPTS),
        "new_tokens": args.new_tokens,
        "equal": sum(equal),
        "mean_common_prefix": sum(prefixes) / len(prefixes),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
