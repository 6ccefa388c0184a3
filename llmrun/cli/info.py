"""``llmrun info``: a model's shapes, parameter count, weight and KV-cache bytes, and its speed of light.

Only config.json is read (a hub repo is fetched without its weights), so a 70B model's numbers
come back in a second. Speed of light is the roofline's lower bound on time on the chosen device:
per phase, the slower of FLOPs ÷ peak FLOP/s and bytes ÷ bandwidth, from the profiler's cost
model (``llmrun.profiler.modelinfo``, docs/roofline.md). The roofs are measured the first time
on a device without any (once; cached), as ``llmrun profile`` does; a GPU in the spec table uses
its datasheet figures until measured.

Examples:

    llmrun info --model preset:llama-3.1-8b --dtype bf16
    llmrun info --model meta-llama/Llama-3.2-1B --device cuda --json | jq .speed_of_light
    llmrun info --model ./my-model --prompt-len 2048
    llmrun info --model preset:llama-3.1-70b --quant int4 --gpu "H100 SXM"   # int4: bytes, GPUs it fits
    llmrun info --list-presets                     # the shapes preset:NAME builds
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from llmrun.cli.info_tp import GpuOption, LinkBandwidthOption, LinkLatencyOption, TpOption, tp_fields, tp_rows
from llmrun.cli.options import (
    DeviceOption,
    DtypeOption,
    JsonOption,
    ModelOption,
    QuantOption,
    RevisionOption,
    check_count,
)
from llmrun.errors import LlmrunError


def info(
    model: ModelOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    revision: RevisionOption = None,
    prompt_len: Annotated[
        int | None,
        typer.Option(
            "--prompt-len", help="Prompt length (tokens) for the prefill speed of light. Default: 512 or the context."
        ),
    ] = None,
    measure: Annotated[
        bool, typer.Option("--measure", help="Measure this device's roofs again (seconds; cached for later runs).")
    ] = False,
    as_json: JsonOption = False,
    list_presets: Annotated[
        bool, typer.Option("--list-presets", help="List the presets (--model preset:NAME) and exit.")
    ] = False,
    random_weights: Annotated[
        bool, typer.Option("--random-weights", help="Accepted as by the other commands; info reads no weights.")
    ] = False,
    quant: QuantOption = None,
    tp: TpOption = 1,
    gpu: GpuOption = None,
    link_bandwidth: LinkBandwidthOption = None,
    link_latency: LinkLatencyOption = None,
) -> None:
    """Show a model's architecture, sizes and speed-of-light decode/prefill on the current device."""
    if list_presets:
        return _print_presets(as_json)
    from llmrun.devices import resolve_device, resolve_dtype
    from llmrun.loading.loader import read_model_args, stored_formats
    from llmrun.loading.presets import is_preset, load_preset
    from llmrun.loading.sources import DEFAULT_MODEL, resolve_model
    from llmrun.model.quant import parse_quant
    from llmrun.profiler.modelinfo import model_info

    quant_spec = parse_quant(quant)  # checked before anything is read
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if prompt_len is not None:
        check_count(prompt_len, "--prompt-len", 1)
    formats: dict[str, str] = {}  # a quantized checkpoint's matrices, as stored (--quant auto)
    if is_preset(model):
        preset = load_preset(model)
        args, source = preset.args, preset.source
    else:
        native = quant_spec.kind == "auto"
        model_dir = resolve_model(model, revision=revision, weights=False, quantized=native)
        args, source = read_model_args(model_dir / "config.json"), str(model_dir)
        formats = stored_formats(model_dir) if native else {}
    if prompt_len is None:
        prompt_len = min(512, args.context_length)
    elif prompt_len > args.context_length:
        raise LlmrunError(f"--prompt-len {prompt_len} exceeds the model's context of {args.context_length}")
    roofs, entry = _roofs(torch_device, torch_dtype, gpu, measure)
    result = model_info(
        args, torch_dtype, roofs, _device(torch_device, entry), prompt_len=prompt_len, quant=quant_spec, formats=formats
    )
    fields = {"model": model or DEFAULT_MODEL, "source": source, **result.to_json()}
    if tp > 1:
        fields["tensor_parallel"] = tp_fields(args, torch_dtype, roofs, entry, tp, link_bandwidth, link_latency)
    if as_json:
        print(json.dumps(fields))
    else:
        _print_table(fields)


def _roofs(device, dtype, gpu: str | None, measure: bool):
    """(roofs, spec-table entry or None): ``--gpu``'s datasheet roofs, else this device's (measured once)."""
    from llmrun.devices import DTYPE_NAMES
    from llmrun.profiler.roofs import match_spec, select_roofs, spec_gpu

    if gpu is not None:
        return spec_gpu(gpu, DTYPE_NAMES[dtype])
    roofs = select_roofs(
        device,
        DTYPE_NAMES[dtype],
        measure="again" if measure else "fallback",
        on_measure=lambda name: print(f"measuring the roofs of {name} (once; cached)", file=sys.stderr),
    )
    entry = match_spec(_device(device, None)["name"]) if device.type == "cuda" else None
    return roofs, entry


def _stored_as(stored: dict[str, str]) -> str:
    """``matrices and embedding F``, or ``matrices F, embedding G`` where they differ."""
    if stored["matrices"] == stored["embedding"]:
        return f"matrices and embedding {stored['matrices']}"
    return f"matrices {stored['matrices']}, embedding {stored['embedding']}"


def _device(device, entry: dict | None) -> dict[str, str]:
    """The ``device`` field: this device, or the spec-table GPU predicted for (``--gpu``)."""
    from llmrun.profiler.roofs import device_info

    return {"name": entry["name"], "kind": "cuda"} if entry is not None else device_info(device)


def _print_presets(as_json: bool) -> None:
    """Every preset: its ``--model`` name, parameter count, layers and hidden size, and the hub model it copies."""
    from llmrun.loading.presets import PRESET_PREFIX, load_preset, preset_names
    from llmrun.model.memory import parameter_counts

    presets = [load_preset(name) for name in preset_names()]
    rows = [
        {
            "model": f"{PRESET_PREFIX}{p.name}",
            "parameters": parameter_counts(p.args).total,
            "layers": p.args.num_hidden_layers,
            "hidden_size": p.args.hidden_size,
            "hub_id": p.hub_id,
        }
        for p in presets
    ]
    if as_json:
        print(json.dumps(rows))
        return
    for row in rows:
        print(f"{row['model']:<28} {_count(row['parameters']):<28} {row['layers']:>3} layers  {row['hub_id']}")


def _print_table(fields: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    p, kv, roofs, sol = fields["parameters"], fields["kv_cache"], fields["roofs"], fields["speed_of_light"]
    window = fields["sliding_window"]
    rope = fields["rope"]["scaling"]
    rope_text = f"theta {fields['rope']['theta']:g}" + (
        f", {rope.get('rope_type', rope.get('type'))} scaling" if rope else ""
    )
    table = Table(title=f"{fields['model']} ({fields['source']})", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("architecture", f"{fields['architecture'] or fields['model_type']} ({fields['model_type']})"),
        (
            "shape",
            f"{fields['layers']} layers, hidden {fields['hidden_size']}, mlp {fields['intermediate_size']}, "
            f"heads {fields['attention_heads']}/{fields['kv_heads']} (q/kv) x {fields['head_dim']}, "
            f"vocab {fields['vocab_size']}" + (", tied embeddings" if fields["tie_word_embeddings"] else ""),
        ),
        (
            "context",
            f"{fields['context_length']} tokens, RoPE {rope_text}"
            + (f", sliding window {', '.join(map(str, window))}" if window else ""),
        ),
        ("parameters", f"{_count(p['total'])} total, {_count(p['non_embedding'])} non-embedding"),
        (
            f"weights ({fields['dtype']}{'' if fields['quant'] == 'none' else ', ' + fields['quant']})",
            f"{_bytes(fields['weight_bytes'])}; read per decoded token {_bytes(fields['decode_bytes_per_token'])}",
        ),
        (
            "stored as",
            f"{_stored_as(fields['stored_as'])}, norms {fields['stored_as']['norms']}; "
            f"{fields['bytes_per_weight']:.3g} bytes per weight; fits in "
            + (", ".join(fields["fits_gpus"]) or "no GPU of the spec table"),
        ),
        (
            "KV cache",
            f"{_bytes(kv['bytes_per_token'])} per token, {_bytes(kv['bytes_full_context'])} at "
            f"{fields['context_length']} tokens",
        ),
        (
            "device roofs",
            f"{fields['device']['name']}: {roofs['peak_flops'] / 1e12:.3g} TFLOP/s, "
            f"{roofs['peak_bytes_per_s'] / 1e9:.4g} GB/s ({roofs['source']})",
        ),
        (
            "speed of light: decode",
            f"{sol['decode_tok_s']:.4g} tok/s (batch 1), {sol['decode_tok_s_full_context']:.4g} tok/s at full context",
        ),
        (
            f"speed of light: prefill {sol['prompt_len']}",
            f"{_seconds(sol['prefill_s'])} ({sol['prefill_flops'] / 1e12:.4g} TFLOP, {sol['prefill_tok_s']:.4g} tok/s)",
        ),
    ]
    if "tensor_parallel" in fields:
        rows += tp_rows(fields["tensor_parallel"], _bytes)
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)


def _seconds(s: float) -> str:
    """0.0123 -> '12.3 ms'."""
    for scale, unit in ((1, "s"), (1e-3, "ms")):
        if s >= scale:
            return f"{s / scale:.4g} {unit}"
    return f"{s * 1e6:.4g} µs"


def _count(n: int) -> str:
    """1234567890 -> '1.23 B (1,234,567,890)'."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g} {unit} ({n:,})"
    return f"{n:,}"


def _bytes(n: float) -> str:
    """Decimal and binary units side by side: '16.06 GB (14.96 GiB)'."""
    for power, (dec, binary) in ((4, ("TB", "TiB")), (3, ("GB", "GiB")), (2, ("MB", "MiB")), (1, ("KB", "KiB"))):
        if n >= 1000**power:
            return f"{n / 1000**power:.4g} {dec} ({n / 1024**power:.4g} {binary})"
    return f"{int(n)} B"
