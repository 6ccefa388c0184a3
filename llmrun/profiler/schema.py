"""JSON Schema (draft 2020-12) of ``llmrun profile --format json``; ``docs/profile-schema.json`` is a copy.

The schema ships inside the package so that an installed llmrun can validate its own output
(``python -m llmrun.profiler.schema`` prints it). Field meanings: docs/roofline.md and
``llmrun.profiler.report.CONVENTIONS``. Units: seconds, FLOPs, bytes, FLOP/s, bytes/s; fractions
are 0..1 (a ``roofline_fraction`` or MFU above 1 means the roof was set too low).
"""

from __future__ import annotations

import json

_NUM = {"type": "number"}
_NONNEG = {"type": "number", "minimum": 0}
_COUNT = {"type": "integer", "minimum": 0}
_NULLABLE_NUM = {"type": ["number", "null"]}


def _object(properties: dict, required: list[str] | None = None) -> dict:
    return {
        "type": "object",
        "properties": properties,
        "required": required if required is not None else list(properties),
        "additionalProperties": False,
    }


OP = _object(
    {
        "layer": {
            "type": ["integer", "null"],
            "minimum": 0,
            "description": "block index; null outside the blocks or for a row averaged over layers",
        },
        "op": {
            "type": "string",
            "description": "named op (llmrun.model.probe); fused ops joined by '+'; on a tensor-parallel rank "
            "also attn_allreduce and mlp_allreduce, whose bytes are link bytes: 2(N-1)/N x the message",
        },
        "layers": {"type": "integer", "minimum": 1, "description": "layer instances the row stands for"},
        "time_s": {**_NONNEG, "description": "median seconds per step (per layer when averaged)"},
        "time_s_iqr": {**_NONNEG, "description": "interquartile range of time_s over the steps"},
        "share": {**_NONNEG, "description": "time_s * layers / totals.time_s"},
        "flops": _NONNEG,
        "bytes": _NONNEG,
        "intensity": {**_NONNEG, "description": "flops / bytes (FLOP per byte)"},
        "achieved_flops_per_s": _NONNEG,
        "achieved_bytes_per_s": _NONNEG,
        "attainable_flops_per_s": {**_NONNEG, "description": "min(peak_flops, intensity * peak_bytes_per_s)"},
        "roofline_fraction": {**_NONNEG, "description": "max(flops/peak_flops, bytes/peak_bytes_per_s) / time_s"},
        "light_s": {**_NONNEG, "description": "speed-of-light seconds, max(flops/peak_flops, bytes/peak_bytes_per_s)"},
        "bound": {"enum": ["memory", "compute", "link"]},
    }
)

TOTALS = _object(
    {
        "time_s": {**_NONNEG, "description": "median wall seconds of the phase (per step for decode)"},
        "time_s_iqr": _NONNEG,
        "time_s_min": _NONNEG,
        "time_s_max": _NONNEG,
        "samples": {"type": "integer", "minimum": 1, "description": "measured steps"},
        "flops": _NONNEG,
        "bytes": _NONNEG,
        "mfu": {**_NONNEG, "description": "flops / time_s / peak_flops"},
        "mbu": {
            **_NONNEG,
            "description": "main-memory bytes (all but the all-reduces' link bytes) / time_s / peak_bytes_per_s",
        },
        "tokens_per_s": {**_NONNEG, "description": "prefill: batch*prompt_len/time_s; decode: batch/time_s"},
        "attributed_s": {**_NONNEG, "description": "median over steps of the sum of op times"},
        "unattributed_s": {**_NUM, "description": "median over steps of wall time not in any op"},
        "unprobed_time_s": {
            "type": ["number", "null"],
            "minimum": 0,
            "description": "median wall seconds of the same decode steps without a probe (null: not measured)",
        },
        "probe_overhead": {**_NULLABLE_NUM, "description": "time_s / unprobed_time_s - 1 (null: not measured)"},
        "communication_s": {
            **_NULLABLE_NUM,
            "description": "tensor parallel: seconds per step in attn_allreduce and mlp_allreduce (null: one rank)",
        },
        "communication_share": {**_NULLABLE_NUM, "description": "communication_s / time_s (null: one rank)"},
    }
)

RUN = _object(
    {
        "phase": {"enum": ["prefill", "decode"]},
        "batch": {"type": "integer", "minimum": 1},
        "prompt_len": {"type": "integer", "minimum": 1},
        "context_len": {"type": "integer", "minimum": 1, "description": "keys seen by attention at the last step"},
        "mean_context_len": {**_NONNEG, "description": "mean over the measured steps"},
        "decode_tokens": {**_COUNT, "description": "decode steps per repeat (0 for prefill)"},
        "path": {"enum": ["fast", "eager"], "description": "what ran: the decode fast path or the eager ops"},
        "ops": {"type": "array", "items": OP, "minItems": 1},
        "totals": TOTALS,
        "notes": {"type": "array", "items": {"type": "string"}, "description": "caveats, e.g. on-chip caches"},
    }
)

SOURCE = _object(
    {
        "source": {"enum": ["measured", "spec", "nvml"]},
        "peak_flops": _NULLABLE_NUM,
        "peak_bytes_per_s": _NULLABLE_NUM,
        "note": {"type": "string"},
    }
)

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://github.com/llmrun/llmrun/docs/profile-schema.json",
    "title": "llmrun profile report",
    "description": "Output of 'llmrun profile --format json'. Seconds, FLOPs, bytes; rates per second.",
    **_object(
        {
            "schema_version": {"const": 1},
            "model": {"type": "string"},
            "dtype": {"enum": ["bf16", "fp16", "fp32"]},
            "device": _object({"name": {"type": "string"}, "kind": {"type": "string"}}),
            "roofs": _object(
                {
                    "peak_flops": {"type": "number", "exclusiveMinimum": 0},
                    "peak_bytes_per_s": {"type": "number", "exclusiveMinimum": 0},
                    "source": {"type": "string", "description": "measured, spec, nvml, override, or one per roof"},
                    "ridge": {"type": "number", "exclusiveMinimum": 0},
                    "sources": {"type": "array", "items": SOURCE},
                }
            ),
            "settings": {"type": "object"},
            "conventions": {"type": "object", "additionalProperties": {"type": "string"}},
            "runs": {"type": "array", "items": RUN, "minItems": 1},
        }
    ),
}


def schema_text() -> str:
    """The schema as indented JSON text (the content of ``docs/profile-schema.json``)."""
    return json.dumps(SCHEMA, indent=2) + "\n"


if __name__ == "__main__":
    print(schema_text(), end="")
