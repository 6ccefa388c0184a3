"""What a model costs before it runs: parameters, weight and KV-cache bytes, and speed-of-light times.

Counts come from the model itself built on the ``meta`` device (no memory), so they are exactly
the tensors llmrun loads. FLOPs follow ROOFLINE.md's cost model with the conventions of
``llmrun.profiler.costs``: a multiply-add is 2 FLOPs, attention counts causal work only (query i
sees min(i+1, window) keys), prefill runs the lm_head on the last position only.

Speed of light (a lower bound on time from the two roofs, never a prediction):

* decode, batch 1: time per token >= max(bytes read ÷ bandwidth, FLOPs ÷ peak); bytes read are
  every weight except the embedding table, of which one row is read, plus the KV cache read so far.
  A tied lm_head still reads the whole matrix, so this is (non-embedding + V·d + d) weights either way.
* prefill of P tokens: time >= max(FLOPs ÷ peak, weight bytes ÷ bandwidth).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmrun.devices import DTYPE_NAMES
from llmrun.model.config import ModelArgs
from llmrun.model.transformer import Transformer


@dataclass(frozen=True)
class ParameterCounts:
    """Element counts. ``non_embedding`` excludes the token embedding and an untied lm_head
    (Kaplan et al. 2020's N); ``total`` counts a tied matrix once."""

    total: int
    embedding: int
    lm_head: int
    non_embedding: int


def parameter_counts(args: ModelArgs) -> ParameterCounts:
    """Parameters of ``Transformer(args)``, counted on the meta device."""
    with torch.device("meta"):
        model = Transformer(args)
    total = sum(p.numel() for p in model.parameters())
    embedding = args.vocab_size * args.hidden_size
    lm_head = 0 if args.tie_word_embeddings else embedding
    return ParameterCounts(total, embedding, lm_head, total - embedding - lm_head)


def kv_bytes_per_token(args: ModelArgs, dtype: torch.dtype) -> int:
    """Bytes of K and V for one token over all layers: 2 · layers · kv_heads · head_dim · element size."""
    return 2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim * dtype.itemsize


def kv_bytes_read(args: ModelArgs, dtype: torch.dtype, context: int) -> int:
    """Bytes of K and V one decode step attends to at ``context`` positions (a sliding window caps it)."""
    per_layer = 2 * args.num_key_value_heads * args.head_dim * dtype.itemsize
    return sum(per_layer * (min(context, w) if w else context) for w in args.attention_windows())


def _linear_weights(args: ModelArgs) -> int:
    """Weights of the blocks' matrix multiplications (q, k, v, o, gate, up, down) over all layers."""
    d, f, hd = args.hidden_size, args.intermediate_size, args.head_dim
    h, k = args.num_attention_heads, args.num_key_value_heads
    return args.num_hidden_layers * (d * (h + 2 * k) * hd + h * hd * d + 3 * d * f)


def _attention_pairs(first: int, last: int, window: int | None) -> int:
    """sum(min(p, window) for p in first..last) in closed form: (query, key) pairs of causal attention."""
    if window is None or last <= window:
        return (first + last) * (last - first + 1) // 2
    if first > window:
        return window * (last - first + 1)
    return (first + window) * (window - first + 1) // 2 + window * (last - window)


def prefill_flops(args: ModelArgs, prompt_len: int) -> float:
    """FLOPs of one prefill of ``prompt_len`` tokens (batch 1): linear layers, causal attention, lm_head."""
    h, hd, d, v = args.num_attention_heads, args.head_dim, args.hidden_size, args.vocab_size
    attention = sum(4 * h * hd * _attention_pairs(1, prompt_len, w) for w in args.attention_windows())
    return 2 * prompt_len * _linear_weights(args) + attention + 2 * d * v


def decode_flops(args: ModelArgs, context: int) -> float:
    """FLOPs of one decode step (batch 1) whose attention sees ``context`` positions."""
    h, hd, d, v = args.num_attention_heads, args.head_dim, args.hidden_size, args.vocab_size
    attention = sum(4 * h * hd * (min(context, w) if w else context) for w in args.attention_windows())
    return 2 * _linear_weights(args) + attention + 2 * d * v


@dataclass(frozen=True)
class Roofs:
    """Peak FLOP/s in the model's dtype and main-memory bytes/s of a device, and where they come from."""

    device: str
    kind: str
    peak_flops: float
    peak_bytes_per_s: float
    source: str


# ROOFLINE.md's measurements of this project's 2-core CPU machine (torch 2.13, 2 threads): used, and
# labelled "assumed", only when this CPU's own roofs were never measured (``llmrun peaks``).
_CPU_ASSUMED = {"fp32": 220e9, "bf16": 680e9}
_CPU_ASSUMED_BYTES_PER_S = 21e9


def device_roofs(device: torch.device, dtype: torch.dtype, *, measure: bool = False) -> Roofs:
    """The roofs of ``device`` for ``dtype`` from ``llmrun.profiler.hardware``: measured (cached by
    ``llmrun peaks``, or now if ``measure``), else the GPU spec table, else NVML's bandwidth.

    A CPU never measured falls back to ROOFLINE.md's figures for this project's machine, and
    ``source`` says they are assumed.
    """
    from llmrun.errors import LlmrunError
    from llmrun.profiler import hardware

    name = DTYPE_NAMES[dtype]
    device_name = hardware.device_info(device)["name"]
    try:
        roofs = hardware.select_roofs(device, name, measure=measure)
    except LlmrunError:
        if device.type != "cpu" or name not in _CPU_ASSUMED:
            raise
        source = "assumed: ROOFLINE.md's measurements of this project's 2-core CPU (run 'llmrun peaks' for yours)"
        return Roofs(device_name, "cpu", _CPU_ASSUMED[name], _CPU_ASSUMED_BYTES_PER_S, source)
    return Roofs(device_name, device.type, roofs.peak_flops, roofs.peak_bytes_per_s, roofs.source)


@dataclass(frozen=True)
class ModelInfo:
    """Sizes of one model in one dtype, and its speed of light on one device (seconds, bytes, FLOPs)."""

    args: ModelArgs
    dtype: torch.dtype
    params: ParameterCounts
    weight_bytes: int
    decode_bytes_per_token: int
    kv_bytes_per_token: int
    context_length: int
    prompt_len: int
    prefill_flops: float
    decode_flops: float
    roofs: Roofs

    @property
    def kv_bytes_full_context(self) -> int:
        """KV cache of one sequence filling the whole context."""
        return self.kv_bytes_per_token * self.context_length

    @property
    def decode_s(self) -> float:
        """Lower bound on one decode step at the start of a sequence (weights only)."""
        return max(self.decode_bytes_per_token / self.roofs.peak_bytes_per_s, self.decode_flops / self.roofs.peak_flops)

    @property
    def decode_full_context_s(self) -> float:
        """Lower bound on the last decode step of a full context (weights plus the KV cache it attends to)."""
        nbytes = self.decode_bytes_per_token + kv_bytes_read(self.args, self.dtype, self.context_length)
        flops = decode_flops(self.args, self.context_length)
        return max(nbytes / self.roofs.peak_bytes_per_s, flops / self.roofs.peak_flops)

    @property
    def prefill_s(self) -> float:
        """Lower bound on a prefill of ``prompt_len`` tokens."""
        return max(
            self.prefill_flops / self.roofs.peak_flops, self.decode_bytes_per_token / self.roofs.peak_bytes_per_s
        )

    def to_json(self) -> dict:
        """A plain dict for ``llmrun info --json`` (bytes, FLOPs, seconds, tokens per second)."""
        a = self.args
        return {
            "architecture": (a.extra.get("architectures") or [None])[0],
            "model_type": a.model_type,
            "layers": a.num_hidden_layers,
            "hidden_size": a.hidden_size,
            "intermediate_size": a.intermediate_size,
            "attention_heads": a.num_attention_heads,
            "kv_heads": a.num_key_value_heads,
            "head_dim": a.head_dim,
            "vocab_size": a.vocab_size,
            "context_length": self.context_length,
            "rope": {"theta": a.rope_theta, "scaling": a.rope_scaling},
            "sliding_window": sorted({w for w in a.attention_windows() if w}) or None,
            "tie_word_embeddings": a.tie_word_embeddings,
            "parameters": {
                "total": self.params.total,
                "embedding": self.params.embedding,
                "lm_head": self.params.lm_head,
                "non_embedding": self.params.non_embedding,
            },
            "dtype": DTYPE_NAMES[self.dtype],
            "weight_bytes": self.weight_bytes,
            "decode_bytes_per_token": self.decode_bytes_per_token,
            "kv_cache": {
                "bytes_per_token": self.kv_bytes_per_token,
                "bytes_full_context": self.kv_bytes_full_context,
            },
            "device": {"name": self.roofs.device, "kind": self.roofs.kind},
            "roofs": {
                "peak_flops": self.roofs.peak_flops,
                "peak_bytes_per_s": self.roofs.peak_bytes_per_s,
                "source": self.roofs.source,
            },
            "speed_of_light": {
                "decode_tok_s": 1 / self.decode_s,
                "decode_tok_s_full_context": 1 / self.decode_full_context_s,
                "prompt_len": self.prompt_len,
                "prefill_flops": self.prefill_flops,
                "prefill_s": self.prefill_s,
                "prefill_tok_s": self.prompt_len / self.prefill_s,
            },
        }


def model_info(args: ModelArgs, dtype: torch.dtype, roofs: Roofs, *, prompt_len: int = 512) -> ModelInfo:
    """Everything ``llmrun info`` shows for ``args`` in ``dtype`` on the device whose ``roofs`` are given."""
    params = parameter_counts(args)
    w = dtype.itemsize
    read_per_token = params.non_embedding + args.vocab_size * args.hidden_size + args.hidden_size
    return ModelInfo(
        args=args,
        dtype=dtype,
        params=params,
        weight_bytes=params.total * w,
        decode_bytes_per_token=read_per_token * w,
        kv_bytes_per_token=kv_bytes_per_token(args, dtype),
        context_length=args.context_length,
        prompt_len=prompt_len,
        prefill_flops=prefill_flops(args, prompt_len),
        decode_flops=decode_flops(args, 1),
        roofs=roofs,
    )
