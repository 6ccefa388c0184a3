"""What a model costs before it runs: parameters, weight and KV-cache bytes, and speed-of-light times.

Parameter and KV-cache counts come from the shapes (``llmrun.model.memory``; a test holds them to
the tensors llmrun builds). Every FLOP and byte figure is a phase sum of the profiler's cost model
(``llmrun.profiler.costs``: a multiply-add is 2 FLOPs, attention counts causal work only, prefill
runs the lm_head on the last position only), and every time is ``Roofs.light_s`` of it: the
slower of FLOPs ÷ peak FLOP/s and bytes ÷ bandwidth (docs/roofline.md). Batch 1 throughout:

* decode: one step at the start of a sequence, and the last step of a full context (which also
  reads the KV cache of every position it attends to);
* prefill of P tokens: one step of P tokens from an empty cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmrun.devices import DTYPE_NAMES
from llmrun.model.config import ModelArgs
from llmrun.model.memory import (
    EMBEDDING,
    ParameterCounts,
    kv_cache_bytes,
    matrix_shapes,
    matrix_widths,
    parameter_counts,
    quant_formats,
    weight_bytes,
)
from llmrun.model.quant import QuantSpec
from llmrun.profiler.costs import Cost, Widths, decode_weight_bytes, prefill_costs, step_costs, total
from llmrun.profiler.roofs import Roofs, load_table


@dataclass(frozen=True)
class ModelInfo:
    """Sizes of one model in one dtype, and its speed of light on one device (seconds, bytes, FLOPs).

    ``prefill``, ``decode`` and ``decode_full_context`` are the cost model's totals of one prefill
    of ``prompt_len`` tokens, the first decode step, and the last decode step of a full context.
    ``device`` is {name, kind}, as in the profile report.
    """

    args: ModelArgs
    dtype: torch.dtype
    params: ParameterCounts
    weight_bytes: int
    decode_bytes_per_token: int
    kv_bytes_per_token: int
    context_length: int
    prompt_len: int
    prefill: Cost
    decode: Cost
    decode_full_context: Cost
    roofs: Roofs
    device: dict[str, str]
    quant: str = "none"
    formats: dict[str, str] = field(default_factory=dict)

    @property
    def kv_bytes_full_context(self) -> int:
        """KV cache of one sequence filling the whole context."""
        return self.kv_bytes_per_token * self.context_length

    @property
    def decode_s(self) -> float:
        """Lower bound on one decode step at the start of a sequence."""
        return self.roofs.light_s(self.decode.flops, self.decode.bytes)

    @property
    def decode_full_context_s(self) -> float:
        """Lower bound on the last decode step of a full context (weights plus the KV cache it attends to)."""
        return self.roofs.light_s(self.decode_full_context.flops, self.decode_full_context.bytes)

    @property
    def prefill_s(self) -> float:
        """Lower bound on a prefill of ``prompt_len`` tokens."""
        return self.roofs.light_s(self.prefill.flops, self.prefill.bytes)

    def storage_json(self) -> dict:
        """What each tensor kind is stored as, its bytes per weight, and the spec-table GPUs the weights fit in."""
        floats = DTYPE_NAMES[self.dtype]
        matrices = {self.formats.get(name, floats) for name in matrix_shapes(self.args) if name != EMBEDDING}
        width = self.weight_bytes / self.params.total  # the average over every weight, as held
        fits = [g["name"] for g in load_table() if g.get("memory_bytes", 0) >= self.weight_bytes]
        return {
            "quant": self.quant,
            "stored_as": {
                "matrices": ", ".join(sorted(matrices)),
                "embedding": self.formats.get(EMBEDDING, floats),
                "norms": floats,
            },
            "bytes_per_weight": width,
            "fits_gpus": fits,
        }

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
            **self.storage_json(),
            "weight_bytes": self.weight_bytes,
            "decode_bytes_per_token": self.decode_bytes_per_token,
            "kv_cache": {
                "bytes_per_token": self.kv_bytes_per_token,
                "bytes_full_context": self.kv_bytes_full_context,
            },
            "device": dict(self.device),
            "roofs": self.roofs.to_json(detail=False),
            "speed_of_light": {
                "decode_tok_s": 1 / self.decode_s,
                "decode_tok_s_full_context": 1 / self.decode_full_context_s,
                "prompt_len": self.prompt_len,
                "prefill_flops": self.prefill.flops,
                "prefill_s": self.prefill_s,
                "prefill_tok_s": self.prompt_len / self.prefill_s,
            },
        }


def model_info(
    args: ModelArgs,
    dtype: torch.dtype,
    roofs: Roofs,
    device: dict[str, str],
    *,
    prompt_len: int = 512,
    quant: QuantSpec | None = None,
    formats: dict[str, str] | None = None,
) -> ModelInfo:
    """Everything ``llmrun info`` shows for ``args`` in ``dtype`` on ``device`` ({name, kind}) with these ``roofs``.

    ``quant`` (int8, int4:G) predicts the model with its matrices and embedding stored that way, and
    ``formats`` (checkpoint name -> format, ``llmrun.loading.loader.stored_formats``) as a quantized
    checkpoint stores them (``quant`` auto): the cost model's weight bytes are then each matrix's codes
    plus its scales and zeros in the form the default kernel of ``device``'s kind holds them
    (``llmrun.model.memory.matrix_widths``).
    """
    params = parameter_counts(args)
    kind = device.get("kind", "cpu")
    named = quant is not None and quant.kind in ("int8", "int4")
    formats = quant_formats(args, quant) if named else dict(formats or {})
    widths = Widths(dtype.itemsize, dtype.itemsize, dtype.itemsize, matrix_widths(args, dtype, formats, kind))
    context = args.context_length
    return ModelInfo(
        args=args,
        dtype=dtype,
        params=params,
        weight_bytes=weight_bytes(args, dtype, formats, kind),
        decode_bytes_per_token=decode_weight_bytes(args, widths),
        kv_bytes_per_token=kv_cache_bytes(args, 1, 1, dtype),
        context_length=context,
        prompt_len=prompt_len,
        prefill=total(prefill_costs(args, 1, prompt_len, widths)),
        decode=total(step_costs(args, 1, 1, 0, widths)),
        decode_full_context=total(step_costs(args, 1, 1, context - 1, widths)),
        roofs=roofs,
        device=device,
        quant=quant.name if named else ("auto" if formats else "none"),
        formats=formats,
    )
