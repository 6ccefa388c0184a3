"""Import a llama.cpp GGUF file (architecture ``llama``) into a Hugging Face-layout directory.

The output directory holds ``config.json``, ``model.safetensors`` (every tensor dequantized to one float
dtype), ``tokenizer.json``, ``tokenizer_config.json`` and ``generation_config.json``, so the rest of
llmrun (and Hugging Face transformers) sees one format.

References followed:
- llama.cpp ``convert_hf_to_gguf.py`` (``LlamaModel``): tensor names, the rotary row permutation of
  ``q_proj``/``k_proj`` undone here, and the ``rope_freqs`` tensor written for Llama 3 rope scaling.
- llama.cpp ``src/llama-vocab.cpp``: which pre-tokenizer regexes each ``tokenizer.ggml.pre`` value means.
- gguf-py (``GGUFReader``, ``gguf.quants.dequantize``) and the safetensors file format spec.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.gguf_reader import ReaderField, ReaderTensor
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from llmrun.errors import LlmrunError
from llmrun.generation.generation_config import value_problem

# Requested dtype -> (canonical name written to config.json, torch dtype, safetensors dtype tag).
_DTYPES: dict[str, tuple[str, torch.dtype, str]] = {
    "float32": ("float32", torch.float32, "F32"),
    "fp32": ("float32", torch.float32, "F32"),
    "bfloat16": ("bfloat16", torch.bfloat16, "BF16"),
    "bf16": ("bfloat16", torch.bfloat16, "BF16"),
    "float16": ("float16", torch.float16, "F16"),
    "fp16": ("float16", torch.float16, "F16"),
}

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
# Consumed into config.json (Llama 3 rope scaling), not written as a weight.
_ROPE_FREQS = "rope_freqs.weight"

# Byte-level BPE split regexes, as in the Hugging Face tokenizer.json files of the model families
# (llama.cpp's src/llama-vocab.cpp uses the same splits).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# GGUF token types (gguf.TokenType): 3 = CONTROL, 4 = USER_DEFINED.
_CONTROL, _USER_DEFINED = 3, 4
_SPECIAL_ROLES = ("bos", "eos", "unknown", "padding", "eot", "eom")


@dataclass(frozen=True)
class _TensorJob:
    """One output tensor: where it comes from, its HF name and numpy shape, and the rotary heads to undo."""

    hf_name: str
    source: ReaderTensor
    shape: tuple[int, ...]
    unpermute_heads: int = 0


class _Metadata:
    """Typed access to a GGUF file's key/value metadata, each key decoded once on first use."""

    def __init__(self, fields: dict[str, ReaderField]) -> None:
        self._fields = fields
        self._decoded: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        """Value of ``key`` (str, int, float, bool or a list of those), or ``default`` when absent."""
        if key not in self._fields:
            return default
        if key not in self._decoded:
            self._decoded[key] = _field_value(key, self._fields[key])
        return self._decoded[key]

    def require(self, key: str) -> Any:
        """Value of ``key``; a missing key is an ``LlmrunError``."""
        value = self.get(key)
        if value is None:
            raise LlmrunError(f"The GGUF file lacks the metadata key {key!r}; it cannot be imported.")
        return value


def import_gguf(
    gguf_path: Path, out_dir: Path, dtype: str = "float32", *, overwrite: bool = False, progress: bool = True
) -> Path:
    """Import a llama.cpp GGUF file (architecture ``llama``) into a Hugging Face-layout directory.

    Every tensor is dequantized (F32/F16/BF16, Q4_0..Q8_0, K-quants, whatever ``gguf.quants``
    supports) to ``dtype`` (``float32``, ``bfloat16`` or ``float16``), the llama.cpp rotary row
    permutation of ``q_proj``/``k_proj`` is undone, and the tokenizer is rebuilt from the GGUF vocabulary.
    Everything is written into a temporary directory next to ``out_dir`` and renamed into place at the
    end, so an error or Ctrl-C leaves nothing at ``out_dir``.

    Args:
        gguf_path: the ``.gguf`` file.
        out_dir: the directory to create; it must not exist or be empty unless ``overwrite``.
        dtype: float dtype of the written weights.
        overwrite: replace an existing non-empty ``out_dir``.
        progress: show a progress bar over tensors on stderr.

    Returns:
        ``out_dir``.

    Raises:
        LlmrunError: unreadable or truncated file, not a ``llama`` model, an unsupported quantization,
            rope scaling (YaRN) or tokenizer type, or an occupied ``out_dir``.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    dtype_name, torch_dtype, st_dtype = _resolve_dtype(dtype)
    _check_out_dir(out_dir, overwrite)
    reader = _open_reader(gguf_path)
    meta = _Metadata(reader.fields)
    _check_architecture(meta, gguf_path)
    tensors = {t.name: t for t in reader.tensors}
    config = _build_config(meta, tensors, dtype_name)
    jobs = _plan_tensors(tensors, config)
    _check_quant_types(jobs)
    tokenizer = _build_tokenizer(meta)
    with _atomic_dir(out_dir) as tmp:
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", _generation_config(meta))
        _write_json(tmp / "tokenizer_config.json", _tokenizer_config(meta, config))
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_safetensors(tmp / "model.safetensors", jobs, torch_dtype, st_dtype, progress)
    return out_dir


# ---------------------------------------------------------------- inputs


def _resolve_dtype(dtype: str) -> tuple[str, torch.dtype, str]:
    """Canonical name, torch dtype and safetensors tag for a requested dtype string."""
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise LlmrunError(f"Unsupported dtype {dtype!r} for GGUF import; use float32, bfloat16 or float16.") from None


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse an existing ``out_dir`` that is a file or a non-empty directory, unless ``overwrite``."""
    if overwrite or not (out_dir.exists() or out_dir.is_symlink()):
        return
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        return
    raise LlmrunError(f"{out_dir} already exists and is not empty; use --overwrite (overwrite=True) to replace it.")


def _open_reader(path: Path) -> GGUFReader:
    """Parse the GGUF header, metadata and tensor index (tensor data stays memory-mapped)."""
    if not path.is_file():
        raise LlmrunError(f"GGUF file not found: {path}; check the path.")
    try:
        return GGUFReader(path, "r")
    except Exception as exc:  # the reader raises ValueError, IndexError, KeyError, ... on bad bytes
        raise LlmrunError(
            f"{path} is not a readable GGUF file (truncated or corrupt: {type(exc).__name__}: {exc}); "
            "download it again."
        ) from exc


def _field_value(key: str, field: ReaderField) -> Any:
    """Decode one GGUF metadata field into Python values (strings are UTF-8)."""
    try:
        if field.types[0] == GGUFValueType.ARRAY:
            if field.types[-1] == GGUFValueType.STRING:
                return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
            return [field.parts[i][0].item() for i in field.data]
        if field.types[0] == GGUFValueType.STRING:
            return bytes(field.parts[field.data[0]]).decode("utf-8")
        return field.parts[field.data[0]][0].item()
    except (IndexError, UnicodeDecodeError) as exc:
        raise LlmrunError(f"The GGUF metadata key {key!r} is corrupt ({exc}); download the file again.") from exc


def _check_architecture(meta: _Metadata, path: Path) -> None:
    """Only ``general.architecture == "llama"`` is imported."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise LlmrunError(
            f"{path.name} holds a {arch!r} model, but only the 'llama' architecture can be imported; "
            "use a Llama-family GGUF."
        )


def _f32_meta(value: float) -> float:
    """A float32 metadata value as the short decimal it was written from (9.99999975e-06 -> 1e-05)."""
    return float(f"{value:.7g}")


# ---------------------------------------------------------------- config


def _build_config(meta: _Metadata, tensors: dict[str, ReaderTensor], dtype_name: str) -> dict[str, Any]:
    """HF ``LlamaConfig`` fields from the ``llama.*`` metadata and the tensor shapes."""
    if "token_embd.weight" not in tensors:
        raise LlmrunError("The GGUF file has no token_embd.weight tensor; it is not a complete llama model.")
    hidden = int(meta.require("llama.embedding_length"))
    n_head = int(meta.require("llama.attention.head_count"))
    n_kv = int(meta.get("llama.attention.head_count_kv", n_head))
    head_dim = int(meta.get("llama.attention.key_length", hidden // n_head))
    ffn = meta.require("llama.feed_forward_length")
    if isinstance(ffn, list):
        raise LlmrunError("The GGUF model has per-layer feed-forward sizes, which llmrun does not support.")
    theta = _f32_meta(meta.get("llama.rope.freq_base", 10000.0))
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(ffn),
        "num_hidden_layers": int(meta.require("llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": int(meta.require("llama.context_length")),
        "rms_norm_eps": _f32_meta(meta.require("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": theta,
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": dtype_name,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
    }
    rope_scaling = _rope_scaling(meta, tensors.get(_ROPE_FREQS), head_dim, theta)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def _rope_scaling(
    meta: _Metadata, rope_freqs: ReaderTensor | None, head_dim: int, theta: float
) -> dict[str, Any] | None:
    """HF ``rope_scaling`` from ``llama.rope.scaling.*`` keys or a Llama 3 ``rope_freqs`` tensor, else None.

    Only scalings llmrun's rotary embedding implements are imported; any other (YaRN, LongRoPE) is refused
    here, before anything is written, rather than written into a config.json that no load accepts.
    """
    kind = meta.get("llama.rope.scaling.type")
    if kind in (None, "none"):
        return None if rope_freqs is None else _llama3_rope_scaling(rope_freqs, head_dim, theta)
    if kind != "linear":
        raise LlmrunError(
            f"The GGUF file uses {kind!r} rope scaling, which llmrun does not implement (it runs linear, "
            "Llama 3 or unscaled RoPE); this model cannot be imported."
        )
    return {"rope_type": "linear", "factor": _f32_meta(meta.require("llama.rope.scaling.factor"))}


def _llama3_rope_factors(
    head_dim: int, theta: float, factor: float, low: float, high: float, original: int
) -> np.ndarray:
    """Per-frequency divisors of Llama 3 rope scaling, (head_dim // 2,) float64, as convert_hf_to_gguf.py.

    Wavelengths (in positions) shorter than ``original / high`` keep 1, longer than ``original / low`` get
    ``factor``, and the band between is interpolated.
    """
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = np.clip((original / wavelen - low) / (high - low), 0.0, 1.0)
    return 1.0 / ((1.0 - smooth) / factor + smooth)


def _llama3_rope_scaling(rope_freqs: ReaderTensor, head_dim: int, theta: float) -> dict[str, Any]:
    """Recognize the ``rope_freqs`` tensor llama.cpp writes for Llama 3.x and give its HF ``rope_scaling``.

    Llama 3.1/3.2/3.3 all use low_freq_factor 1, high_freq_factor 4 and an 8192-token original context
    (their config.json files); ``factor`` is the largest divisor (8 or 32).
    """
    found = np.asarray(rope_freqs.data, dtype=np.float64).reshape(-1)
    scaling = {
        "rope_type": "llama3",
        "factor": _f32_meta(float(found.max())),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    expected = _llama3_rope_factors(
        head_dim, theta, scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"], 8192
    )
    if found.shape != expected.shape or not np.allclose(found, expected, rtol=1e-4):
        raise LlmrunError(
            "The GGUF rope_freqs tensor does not match Llama 3 rope scaling; this rope variant is not supported."
        )
    return scaling


# ---------------------------------------------------------------- tensors


def _tensor_job(name: str, tensor: ReaderTensor, config: dict[str, Any]) -> _TensorJob:
    """Map one GGUF tensor to its HF checkpoint key; unknown names are an ``LlmrunError``."""
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    if name in _GLOBAL_TENSORS:
        return _TensorJob(_GLOBAL_TENSORS[name], tensor, shape)
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
    return _TensorJob(f"model.layers.{int(layer)}.{_LAYER_TENSORS[suffix]}", tensor, shape, heads.get(suffix, 0))


def _plan_tensors(tensors: dict[str, ReaderTensor], config: dict[str, Any]) -> list[_TensorJob]:
    """Map every GGUF tensor to its output; check that each layer is complete."""
    jobs = [_tensor_job(name, t, config) for name, t in tensors.items() if name != _ROPE_FREQS]
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{suffix}" for i in range(config["num_hidden_layers"]) for suffix in _LAYER_TENSORS.values()
    }
    missing = sorted(expected - {job.hf_name for job in jobs})
    if missing:
        raise LlmrunError(f"The GGUF file lacks {len(missing)} tensor(s), e.g. {missing[0]}; it is incomplete.")
    return jobs


def _check_quant_types(jobs: list[_TensorJob]) -> None:
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


def _load_tensor(job: _TensorJob) -> np.ndarray:
    """The HF-layout float32 array of one output tensor, shape ``job.shape``."""
    try:
        array = _dequantize_raw(job.source.data, job.source.tensor_type).reshape(job.shape)
    except (ValueError, IndexError) as exc:
        raise LlmrunError(
            f"Tensor {job.source.name} of the GGUF file could not be decoded ({exc}); download the file again."
        ) from exc
    if job.unpermute_heads:
        array = _unpermute_rotary(array, job.unpermute_heads)
    return array


def _write_safetensors(
    path: Path, jobs: list[_TensorJob], torch_dtype: torch.dtype, st_dtype: str, progress: bool
) -> None:
    """Stream all tensors into one safetensors file, dequantizing one tensor at a time (bounded memory).

    Layout (safetensors spec): u64 little-endian header length, JSON header with per-tensor
    ``dtype``/``shape``/``data_offsets`` (bytes, relative to the data section), space-padded to 8 bytes,
    then the raw little-endian tensor data in header order.
    """
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for job in jobs:
        nbytes = math.prod(job.shape) * itemsize
        header[job.hf_name] = {"dtype": st_dtype, "shape": list(job.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as f, _progress_bar(progress, len(jobs)) as advance:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for job in jobs:
            tensor = torch.from_numpy(np.require(_load_tensor(job), requirements=["C", "W"])).to(torch_dtype)
            f.write(tensor.view(torch.uint8).numpy())
            advance()


@contextmanager
def _progress_bar(enabled: bool, total: int) -> Iterator[Any]:
    """A rich progress bar over ``total`` tensors on stderr; yields a no-argument ``advance`` callable.

    Off when stderr is not a terminal: logs and pipes get no bar lines before a result or an error.
    """
    console = Console(stderr=True)
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tensors"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, disable=not (enabled and console.is_terminal)) as bar:
        task = bar.add_task("Importing GGUF", total=total)
        yield lambda: bar.advance(task)


# ---------------------------------------------------------------- tokenizer


def _pre_tokenizer(pre: str) -> tuple[pre_tokenizers.PreTokenizer, normalizers.Normalizer | None, bool]:
    """Pre-tokenizer, normalizer and BPE ``ignore_merges`` for a ``tokenizer.ggml.pre`` value.

    As llama.cpp's llama-vocab.cpp: ``smollm`` (and the StarCoder family) isolate every digit, then apply
    GPT-2's split (HF: ``Digits(individual_digits=True)`` + ``ByteLevel``); ``gpt2`` and ``default`` are
    GPT-2's split alone; ``llama-bpe`` is Llama 3's split (digits in groups of up to 3) with whole-word vocab
    hits taking precedence over merges; ``qwen2`` is the same split with single digits and NFC.
    """
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("default", "gpt2"):
        return byte_level, None, False
    if pre in ("smollm", "starcoder"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]), None, False
    split = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}.get(pre)
    if split is None:
        raise LlmrunError(
            f"The GGUF pre-tokenizer {pre!r} is not supported; supported: default, gpt2, smollm, starcoder, "
            "llama-bpe, qwen2."
        )
    sequence = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return sequence, (normalizers.NFC() if pre == "qwen2" else None), pre != "qwen2"


def _build_tokenizer(meta: _Metadata) -> Tokenizer:
    """A byte-level BPE ``tokenizers.Tokenizer`` from the GGUF vocabulary, merges and token types."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise LlmrunError(
            f"The GGUF tokenizer type {model!r} is not supported (only byte-level BPE, 'gpt2'); "
            "use a model with a BPE tokenizer."
        )
    tokens: list[str] = meta.require("tokenizer.ggml.tokens")
    types: list[int] = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    special_ids = [meta.get(f"tokenizer.ggml.{role}_token_id") for role in _SPECIAL_ROLES]
    if len(types) != len(tokens) or any(i is not None and not 0 <= i < len(tokens) for i in special_ids):
        raise LlmrunError("The GGUF token types or special token ids do not match its vocabulary; it is corrupt.")
    merges = [tuple(m.split(" ", 1)) for m in meta.require("tokenizer.ggml.merges")]
    pre_tokenizer, normalizer, ignore_merges = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    try:
        bpe = BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=ignore_merges)
    except Exception as exc:  # tokenizers raises a bare Exception for merges outside the vocabulary
        raise LlmrunError(f"The GGUF vocabulary and merges are inconsistent ({exc}); the file is corrupt.") from exc
    tokenizer = Tokenizer(bpe)
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = _post_processor(meta, tokens)
    added = list(zip(tokens, types, strict=True))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in added if k == _CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in added if k == _USER_DEFINED])
    return tokenizer


def _post_processor(meta: _Metadata, tokens: list[str]) -> processors.PostProcessor:
    """Byte-level offsets, plus BOS/EOS around each sequence when ``add_bos_token``/``add_eos_token``."""
    byte_level = processors.ByteLevel(trim_offsets=False)
    specials = []
    for role in ("bos", "eos"):
        token_id = meta.get(f"tokenizer.ggml.{role}_token_id")
        if meta.get(f"tokenizer.ggml.add_{role}_token", False) and token_id is not None:
            specials.append((role, tokens[token_id], token_id))
    if not specials:
        return byte_level
    bos = [tok for role, tok, _ in specials if role == "bos"]
    eos = [tok for role, tok, _ in specials if role == "eos"]
    template = processors.TemplateProcessing(
        single=[*bos, "$A", *eos],
        pair=[*bos, "$A", *eos, *bos, "$B:1", *eos],
        special_tokens=[(tok, token_id) for _, tok, token_id in specials],
    )
    return processors.Sequence([byte_level, template])


def _special_token(meta: _Metadata, role: str) -> str | None:
    """The text of the ``role`` (bos, eos, unk, padding) token, or None."""
    token_id = meta.get(f"tokenizer.ggml.{role}_token_id")
    return None if token_id is None else meta.require("tokenizer.ggml.tokens")[token_id]


def _tokenizer_config(meta: _Metadata, config: dict[str, Any]) -> dict[str, Any]:
    """``tokenizer_config.json``: special tokens, BOS/EOS flags, context length and chat template."""
    result: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "bos_token": _special_token(meta, "bos"),
        "eos_token": _special_token(meta, "eos"),
        "unk_token": _special_token(meta, "unknown"),
        "pad_token": _special_token(meta, "padding"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    template = meta.get("tokenizer.chat_template")
    if template is not None:
        result["chat_template"] = template
    return result


def _generation_config(meta: _Metadata) -> dict[str, Any]:
    """``generation_config.json``: BOS id, every end-of-turn id (eos, eot, eom), and the file's sampling defaults."""
    eos_ids = []
    for role in ("eos", "eot", "eom"):
        token_id = meta.get(f"tokenizer.ggml.{role}_token_id")
        if token_id is not None and token_id not in eos_ids:
            eos_ids.append(token_id)
    if len(eos_ids) == 1:
        eos_ids = eos_ids[0]
    config = {"bos_token_id": meta.get("tokenizer.ggml.bos_token_id"), "eos_token_id": eos_ids or None}
    return {**config, **_sampling_defaults(meta)}


# general.sampling.* key -> generation_config.json key (the SamplingParams field of the same name)
_SAMPLING_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_k": "top_k",
    "general.sampling.top_p": "top_p",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
}


def _sampling_defaults(meta: _Metadata) -> dict[str, Any]:
    """The sampling defaults a GGUF's publisher set (``general.sampling.*``), as generation_config.json keys.

    llama.cpp's conventions become llmrun's: a temperature <= 0 is greedy (0, and ``do_sample``
    false), a top-k <= 0 is off (0); any default given means sampling (``do_sample`` true) otherwise,
    as llama.cpp samples. The repetition penalty is taken only where it covers the whole context
    (``penalty_last_n`` -1), as llmrun's does; llama.cpp's default window is the last 64 tokens. A
    value of the wrong type or out of range is left out, with a note on stderr: the model still
    imports, and llmrun's default applies.
    """
    defaults: dict[str, Any] = {}
    for gguf_key, key in _SAMPLING_KEYS.items():
        value = meta.get(gguf_key)
        if value is None or (key == "repetition_penalty" and meta.get("general.sampling.penalty_last_n") != -1):
            continue
        if isinstance(value, float):
            value = _f32_meta(value)
        if key in ("temperature", "top_k") and isinstance(value, (int, float)) and value <= 0:
            value = type(value)(0)
        problem = value_problem(key, value)
        if problem is not None:
            print(f"llmrun: note: {gguf_key} {problem}; left out of generation_config.json", file=sys.stderr)
            continue
        defaults[key] = value
    if defaults:
        defaults["do_sample"] = defaults.get("temperature", 1) > 0
    return defaults


# ---------------------------------------------------------------- output


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    """Write ``obj`` as indented UTF-8 JSON."""
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


@contextmanager
def _atomic_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary directory next to ``out_dir``; on success rename it to ``out_dir``.

    On any exception (KeyboardInterrupt included) the temporary directory is removed and ``out_dir`` is
    left as it was. An existing ``out_dir`` (empty, or replaced under ``overwrite``) is moved aside first.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex[:8]}.importing"
    tmp.mkdir()
    try:
        yield tmp
        if out_dir.exists() or out_dir.is_symlink():
            _swap_in(tmp, out_dir)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(new: Path, out_dir: Path) -> None:
    """Replace the existing ``out_dir`` (directory, file or link) by ``new``; put it back if that fails."""
    old = new.with_suffix(".old")
    os.replace(out_dir, old)
    try:
        os.replace(new, out_dir)
    except BaseException:
        os.replace(old, out_dir)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()
