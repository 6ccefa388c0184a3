"""Peak resident memory of loading a model (and running one forward pass), relative to its weights.

Usage: python scripts/load_memory.py [MODEL_DIR] [--dtype fp32] [--quant none|auto|int8|int4[:G]]

Prints one JSON object: weight bytes in the file, peak RSS growth (bytes) over the process's
state just before loading, and their ratio. Run in a fresh process: ru_maxrss is a process-wide peak.
``--quant auto`` loads a GGUF's quantized import (the default model's own form, as ``generate`` runs it);
``none`` (the default) its float one.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys

import torch

from llmrun.devices import DTYPES
from llmrun.loading.loader import load_model
from llmrun.loading.safetensors import checkpoint_files, read_index
from llmrun.loading.sources import resolve_model
from llmrun.model.executor import forward
from llmrun.model.quant import QuantSpec, parse_quant


def load_quant(quant: QuantSpec) -> QuantSpec | None:
    """``load_model``'s ``quant``: None keeps the checkpoint's own form (``auto``)."""
    return None if quant.kind == "auto" else quant


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="model directory (default: the default model)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--quant", default="none", help="none (float), auto (as stored), int8 or int4[:GROUP]")
    args = parser.parse_args()
    quant = parse_quant(args.quant)
    model_dir = resolve_model(args.model, progress=False, quantized=quant.kind == "auto")
    weight_bytes = sum(e.end - e.begin for e in read_index(checkpoint_files(model_dir)).values())
    torch.zeros(1).add_(1)  # let torch set up its allocator before the baseline
    before = peak_rss_bytes()
    model = load_model(model_dir, torch.device("cpu"), DTYPES[args.dtype], progress=False, quant=load_quant(quant))
    after_load = peak_rss_bytes()
    forward(model, torch.tensor([[1, 2, 3, 4]]))
    after_forward = peak_rss_bytes()
    result = {
        "model_dir": str(model_dir),
        "dtype": args.dtype,
        "quant": quant.name,
        "weight_bytes": weight_bytes,
        "peak_growth_load_bytes": after_load - before,
        "peak_growth_load_and_forward_bytes": after_forward - before,
        "ratio": (after_forward - before) / weight_bytes,
    }
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
