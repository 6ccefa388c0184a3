"""The tensors of an imported GGUF: GGUF names to HF names, dequantized, with llama.cpp's rotary permutation undone."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType
from gguf.gguf_reader import ReaderTensor

from llmrun.errors import LlmrunError
from llmrun.loading.gguf.config import ROPE_FREQS

# GGUF tensor name suffix inside ``blk.{i}.`` -> HF name suffix inside ``model.layers.{i}.``.
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: where it comes from, its HF name and shape (row-major), and the rotary heads to undo."""

    hf_name: str
    source: ReaderTensor
    shape: tuple[int, ...]
    unpermute_heads: int = 0


def plan_tensors(tensors: dict[str, ReaderTensor], config: dict[str, Any]) -> list[TensorJob]:
    """Map every GGUF tensor (by GGUF name) to its output, in file order; check that each layer is complete.

    Raises:
        LlmrunError: a tensor with no place in a plain Llama model, or a missing one.
    """
    jobs = [_tensor_job(name, t, config) for name, t in tensors.items() if name != ROPE_FREQS]
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{suffix}" for i in range(config["num_hidden_layers"]) for suffix in _LAYER_TENSORS.values()
    }
    missing = sorted(expected - {job.hf_name for job in jobs})
    if missing:
        raise LlmrunError(f"The GGUF file lacks {len(missing)} tensor(s), e.g. {missing[0]}; it is incomplete.")
    return jobs


def _tensor_job(name: str, tensor: ReaderTensor, config: dict[str, Any]) -> TensorJob:
    """Map one GGUF tensor to its HF checkpoint key; unknown names are an ``LlmrunError``."""
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    if name in _GLOBAL_TENSORS:
        return TensorJob(_GLOBAL_TENSORS[name], tensor, shape)
    prefix, _, rest = name.partition(".")
    layer, _, suffix = rest.partition(".")
    if prefix != "blk" or not layer.isdigit() or int(layer) >= config["num_hidden_layers"]:
        suffix = ""
    if suffix not in _LAYER_TENSORS:
        raise LlmrunError(
            f"The GGUF tensor {name!r} has no place in a plain Llama model (biases, experts and other "
            "variants are not supported)."
        )
    heads = {"attn_q.weight": config["num_attention_heads"], "attn_k.weight": config["num_key_value_heads"]}
    return TensorJob(f"model.layers.{int(layer)}.{_LAYER_TENSORS[suffix]}", tensor, shape, heads.get(suffix, 0))


def check_quant_types(jobs: list[TensorJob]) -> None:
    """Fail before writing anything if a tensor's type cannot be dequantized (tries one block of each)."""
    tried: set[GGMLQuantizationType] = set()
    for job in jobs:
        qtype = job.source.tensor_type
        if qtype in tried:
            continue
        tried.add(qtype)
        try:
            _dequantize_raw(job.source.data.reshape(-1)[: gguf.GGML_QUANT_SIZES[qtype][1]], qtype)
        except (NotImplementedError, KeyError, ValueError) as exc:
            raise LlmrunError(
                f"Tensor {job.source.name} uses the {qtype.name} type, which gguf {version('gguf')} cannot "
                "dequantize; re-quantize the model (e.g. Q8_0, Q4_K_M) or upgrade the gguf package."
            ) from exc


def load_tensor(job: TensorJob) -> np.ndarray:
    """The HF-layout float32 array of one output tensor, shape ``job.shape``.

    Raises:
        LlmrunError: the tensor's bytes cannot be decoded into that shape (a corrupt file).
    """
    try:
        array = _dequantize_raw(job.source.data, job.source.tensor_type).reshape(job.shape)
    except (ValueError, IndexError) as exc:
        raise LlmrunError(
            f"Tensor {job.source.name} of the GGUF file could not be decoded ({exc}); download the file again."
        ) from exc
    if job.unpermute_heads:
        array = _unpermute_rotary(array, job.unpermute_heads)
    return array


def _dequantize_raw(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Dequantize a GGUF data buffer to float32 (F64 is narrowed, F32/F16 are cast)."""
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.F64):
        return np.asarray(data, dtype=np.float32)
    return gguf.quants.dequantize(data, qtype)


def _unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of a q/k projection, (out, in) -> (out, in).

    convert_hf_to_gguf.py stores ``w.reshape(n_head, 2, d // 2, in).swapaxes(1, 2)`` (d = out // n_head):
    per head, HF's rotate-half layout [x0..x_{d/2-1}, y0..] becomes interleaved pairs [x0, y0, x1, y1, ...].
    """
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
