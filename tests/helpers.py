"""Helpers the tests share: the tiny model shape and a checkpoint writer that uses transformers itself."""

from __future__ import annotations

from pathlib import Path

import torch

TINY = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
)


def save_tiny(
    path: Path, model_type: str = "llama", seed: int = 0, max_shard_size: str | None = None, **overrides
) -> Path:
    """Save a random-weight checkpoint of ``model_type`` with transformers itself; returns ``path``.

    ``max_shard_size`` (e.g. ``"40KB"``) makes transformers write a sharded checkpoint with an index.
    """
    torch.manual_seed(seed)
    config_cls, model_cls = hf_classes(model_type)
    config = config_cls(**{**TINY, **overrides})
    shard = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model_cls(config).eval().save_pretrained(path, **shard)
    return path


def hf_classes(model_type: str):
    """transformers' (config class, causal-LM class) of an architecture llmrun supports."""
    import transformers

    return {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[model_type]


def form_bytes(weight, dtype) -> int:
    """Bytes of what ``weight``'s kernel really multiplies by, counted from the tensors it holds: its form's
    tensors (a packed copy of the codes, scales), or the stored codes plus its own scales (the native
    kernels), or the stored form itself (``dequant``)."""
    from llmrun.model.quant import KERNELS, default_kernel, native

    kernel = KERNELS[weight.kernel or default_kernel(weight, dtype)]
    form = kernel.form(weight, kernel.compute or dtype)
    if form is None:
        return weight.nbytes
    if isinstance(form, native.Operand):
        return weight.codes_bytes + form.nbytes
    return sum(t.nbytes for t in form if isinstance(t, torch.Tensor))
