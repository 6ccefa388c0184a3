"""``config.json`` for an imported GGUF: the ``LlamaConfig`` fields from the ``llama.*`` metadata, and rope scaling."""

from __future__ import annotations

from typing import Any

import numpy as np
from gguf.gguf_reader import ReaderTensor

from llmrun.errors import LlmrunError
from llmrun.loading.gguf.metadata import Metadata, f32_meta
from llmrun.model.config import ModelArgs
from llmrun.model.rope import llama3_inv_freq, rope_inv_freq

# Consumed into config.json (Llama 3 rope scaling), not written as a weight.
ROPE_FREQS = "rope_freqs.weight"


def build_config(meta: Metadata, tensors: dict[str, ReaderTensor], dtype_name: str) -> dict[str, Any]:
    """HF ``LlamaConfig`` fields from the ``llama.*`` metadata and the tensor shapes.

    Args:
        meta: the file's metadata.
        tensors: the file's tensors by GGUF name.
        dtype_name: ``torch_dtype`` to record (``float32``, ``bfloat16`` or ``float16``).
    """
    if "token_embd.weight" not in tensors:
        raise LlmrunError("The GGUF file has no token_embd.weight tensor; it is not a complete llama model.")
    hidden = int(meta.require("llama.embedding_length"))
    n_head = int(meta.require("llama.attention.head_count"))
    if n_head <= 0:
        raise LlmrunError(f"The GGUF metadata says {n_head} attention heads; the file is corrupt.")
    ffn = meta.require("llama.feed_forward_length")
    if isinstance(ffn, list):
        raise LlmrunError("The GGUF model has per-layer feed-forward sizes, which llmrun does not support.")
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(ffn),
        "num_hidden_layers": int(meta.require("llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", n_head)),
        "head_dim": int(meta.get("llama.attention.key_length", hidden // n_head)),
        "max_position_embeddings": int(meta.require("llama.context_length")),
        "rms_norm_eps": f32_meta(meta.require("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": f32_meta(meta.get("llama.rope.freq_base", 10000.0)),
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": dtype_name,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
    }
    rope_scaling = _rope_scaling(meta, tensors.get(ROPE_FREQS), config)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def _rope_scaling(meta: Metadata, rope_freqs: ReaderTensor | None, config: dict[str, Any]) -> dict[str, Any] | None:
    """HF ``rope_scaling`` from ``llama.rope.scaling.*`` keys or a Llama 3 ``rope_freqs`` tensor, else None.

    Only scalings llmrun's rotary embedding implements are imported; any other (YaRN, LongRoPE) is refused
    here, before anything is written, rather than written into a config.json that no load accepts.
    """
    kind = meta.get("llama.rope.scaling.type")
    if kind in (None, "none"):
        return None if rope_freqs is None else _llama3_rope_scaling(rope_freqs, config)
    if kind != "linear":
        raise LlmrunError(
            f"The GGUF file uses {kind!r} rope scaling, which llmrun does not implement (it runs linear, "
            "Llama 3 or unscaled RoPE); this model cannot be imported."
        )
    return {"rope_type": "linear", "factor": f32_meta(meta.require("llama.rope.scaling.factor"))}


def _llama3_rope_scaling(rope_freqs: ReaderTensor, config: dict[str, Any]) -> dict[str, Any]:
    """Recognize the ``rope_freqs`` tensor llama.cpp writes for Llama 3.x and give its HF ``rope_scaling``.

    llama.cpp stores one divisor per frequency, (head_dim // 2,): the plain inverse frequency over the
    scaled one. Llama 3.1/3.2/3.3 all use low_freq_factor 1, high_freq_factor 4 and an 8192-token
    original context (their config.json files); ``factor`` is the largest divisor (8 or 32). The
    divisors are checked against llmrun's own rope code on the config being imported, so what is
    written is what llmrun will run.
    """
    found = np.asarray(rope_freqs.data, dtype=np.float64).reshape(-1)
    mismatch = LlmrunError(
        "The GGUF rope_freqs tensor does not match Llama 3 rope scaling; this rope variant is not supported."
    )
    if found.shape != (config["head_dim"] // 2,):
        raise mismatch
    scaling = {
        "rope_type": "llama3",
        "factor": f32_meta(float(found.max())),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    plain = rope_inv_freq(ModelArgs.from_dict(config, source="the GGUF metadata"))
    expected = (plain / llama3_inv_freq(plain, scaling)).double().numpy()
    if not np.allclose(found, expected, rtol=1e-4):
        raise mismatch
    return scaling
