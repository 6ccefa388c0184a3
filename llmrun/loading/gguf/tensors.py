"""The tensors of an imported GGUF: GGUF names to HF names, dequantized or kept quantized, rotary permutation undone.

Q4_0, Q4_1, Q4_K and Q8_0 matrices can be kept quantized (``load_quantized``) in llmrun's stored
form (``llmrun.model.quant.weight``): per group of 32 columns, w = code · scale (Q8_0, int8 codes)
or w = (code - 8) · scale + zero (4-bit codes 0..15), with float32 scales and zeros:

* Q4_0: w = (q - 8)·d, so scale d, zero 0;
* Q4_1: w = q·d + m, so scale d, zero m + 8d;
* Q4_K: w = q·d·sc - dmin·m per sub-block of 32, so scale d·sc, zero 8·d·sc - dmin·m;
* Q8_0: w = q·d, so scale d.

The same algebra as gguf's own dequantize, evaluated in another order: Q4_0 and Q8_0 give the
same float32 values, Q4_1 and Q4_K the same up to float32 rounding of the sums.
"""

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


QUANTIZED_TYPES = (
    GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q4_1,
    GGMLQuantizationType.Q4_K,
    GGMLQuantizationType.Q8_0,
)


def keeps_quantized(job: TensorJob) -> bool:
    """Whether ``job``'s tensor is a matrix in a type llmrun runs quantized."""
    return job.source.tensor_type in QUANTIZED_TYPES and len(job.shape) == 2


def load_quantized(job: TensorJob) -> dict[str, np.ndarray]:
    """The stored form of a ``keeps_quantized`` tensor: checkpoint suffix -> array, in HF row order.

    ``""``: codes, int8 (N, K) for Q8_0, uint8 (N, K/2) two 4-bit codes per byte (column 2j in the
    high nibble) otherwise; ``"_scale"`` and (4-bit) ``"_zero"``: float32 (N, K/32).

    Raises:
        LlmrunError: the tensor's bytes do not hold that shape (a corrupt file).
    """
    n, k = job.shape
    qtype = job.source.tensor_type
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.asarray(job.source.data).reshape(-1).view(np.uint8)
    if k % block or raw.size != n * (k // block) * block_bytes:
        raise LlmrunError(f"Tensor {job.source.name} of the GGUF file has {raw.size} bytes, not a {qtype.name} "
                          f"({n}, {k}) matrix; download the file again.")  # fmt: skip
    blocks = raw.reshape(n, k // block, block_bytes)
    arrays = _SPLITTERS[qtype](blocks)
    if job.unpermute_heads:
        arrays = {key: _unpermute_rotary(a, job.unpermute_heads) for key, a in arrays.items()}
    return {key: np.ascontiguousarray(a) for key, a in arrays.items()}


def _half(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte ``start`` of every block, as float32 (N, blocks)."""
    return blocks[..., start : start + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Bytes (..., 16·c) holding 32·c codes as ggml lays them (per 32 codes: low nibbles then high) -> codes."""
    low, high = qs & 0x0F, qs >> 4
    return np.stack((low, high), axis=-2).reshape(*qs.shape[:-1], -1)


def _packed(codes: np.ndarray, n: int) -> np.ndarray:
    """Codes (N, ..., 32) 0..15 -> (N, K/2) uint8 with column 2j in the high nibble."""
    flat = codes.reshape(n, -1)
    return (flat[:, 0::2] << 4) | flat[:, 1::2]


def _split_q8_0(blocks: np.ndarray) -> dict[str, np.ndarray]:
    n = blocks.shape[0]
    return {"": blocks[..., 2:].copy().view(np.int8).reshape(n, -1), "_scale": _half(blocks, 0)}


def _split_q4_0(blocks: np.ndarray) -> dict[str, np.ndarray]:
    d = _half(blocks, 0)
    return {"": _packed(_nibbles(blocks[..., 2:]), blocks.shape[0]), "_scale": d, "_zero": np.zeros_like(d)}


def _split_q4_1(blocks: np.ndarray) -> dict[str, np.ndarray]:
    d, m = _half(blocks, 0), _half(blocks, 2)
    return {"": _packed(_nibbles(blocks[..., 4:]), blocks.shape[0]), "_scale": d, "_zero": m + 8 * d}


def _split_q4_k(blocks: np.ndarray) -> dict[str, np.ndarray]:
    n, nb = blocks.shape[:2]
    d, dmin = _half(blocks, 0)[..., None], _half(blocks, 2)[..., None]
    sc, mins = gguf.quants.Q4_K.get_scale_min(blocks[..., 4:16].reshape(n * nb, 12))
    scale = d * sc.reshape(n, nb, 8).astype(np.float32)
    zero = 8 * scale - dmin * mins.reshape(n, nb, 8).astype(np.float32)
    qs = blocks[..., 16:].reshape(n, nb, 4, 32)  # 4 chunks of 64 codes: 32 low nibbles, then 32 high
    codes = np.stack((qs & 0x0F, qs >> 4), axis=-2)  # (N, blocks, 4, 2, 32): sub-block 2c + nibble
    return {"": _packed(codes, n), "_scale": scale.reshape(n, -1), "_zero": zero.reshape(n, -1)}


_SPLITTERS = {
    GGMLQuantizationType.Q4_0: _split_q4_0,
    GGMLQuantizationType.Q4_1: _split_q4_1,
    GGMLQuantizationType.Q4_K: _split_q4_k,
    GGMLQuantizationType.Q8_0: _split_q8_0,
}


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
