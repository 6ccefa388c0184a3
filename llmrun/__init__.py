"""llmrun: run Llama-family models from the terminal and profile them against the roofline.

The library's entry points are importable from here; each loads its module (and torch) on first
use, so ``import llmrun`` stays cheap::

    from llmrun import open_session, generate_tokens, Sampler, SamplingParams
    session = open_session(None, "cpu", "fp32")            # the default model
    ids = session.tokenizer.encode("The capital of France is")
    for token in generate_tokens(session.model, ids, Sampler(SamplingParams(temperature=0)), max_new_tokens=8):
        print(session.tokenizer.decode([token]), end="")
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    "LlmrunError": "llmrun.errors",
    "ModelArgs": "llmrun.model.config",
    "Transformer": "llmrun.model.transformer",
    "KVCache": "llmrun.model.kvcache",
    "make_cache": "llmrun.model.executor",
    "forward": "llmrun.model.executor",
    "prefill": "llmrun.model.executor",
    "decode_step": "llmrun.model.executor",
    "load_model": "llmrun.loading.loader",
    "resolve_model": "llmrun.loading.sources",
    "open_session": "llmrun.loading.session",
    "Session": "llmrun.loading.session",
    "random_model": "llmrun.loading.presets",
    "load_preset": "llmrun.loading.presets",
    "Tokenizer": "llmrun.generation.tokenizer",
    "Sampler": "llmrun.generation.sampling",
    "SamplingParams": "llmrun.generation.sampling",
    "generate_tokens": "llmrun.generation.generate",
    "GenerationStats": "llmrun.generation.generate",
    "perplexity": "llmrun.generation.perplexity",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llmrun' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
