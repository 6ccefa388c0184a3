"""``llmrun peaks``: measure this device's roofs (GEMM FLOP/s per dtype, memory bandwidth) and cache them.

``llmrun profile`` divides by these measured roofs unless told otherwise; the spec-sheet and NVML
figures are shown beside them, each labelled with where it comes from.

Examples:

    llmrun peaks                      # cached figures, measured the first time
    llmrun peaks --refresh            # measure again (do it on a quiet machine)
    llmrun peaks --device cuda --json
    llmrun peaks --device cpu --dtype fp16
    llmrun peaks --tp 2               # the link: all-reduce latency and bus bandwidth
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from llmrun.cli.options import DeviceOption, JsonOption
from llmrun.cli.peaks_tp import link_peaks
from llmrun.distributed.group import in_group
from llmrun.errors import LlmrunError


def peaks(
    device: DeviceOption = "auto",
    dtype: Annotated[
        str | None,
        typer.Option("--dtype", help="Also measure these dtypes, e.g. fp16 (default: fp32,bf16 on CPU; all on GPU)."),
    ] = None,
    refresh: Annotated[
        bool, typer.Option("--refresh", help="Measure again (the decode kernels too) instead of using the cache.")
    ] = False,
    as_json: JsonOption = False,
    tp: Annotated[
        int, typer.Option("--tp", help="Measure the link instead: all-reduce latency and bus bandwidth over N ranks.")
    ] = 1,
) -> None:
    """Measured, spec-sheet and NVML roofs of a device."""
    if tp != 1 or in_group():
        return link_peaks(tp, device, as_json)
    from rich.console import Console
    from rich.table import Table

    from llmrun.devices import resolve_device
    from llmrun.profiler import peaks as P
    from llmrun.profiler.roofs import device_info, nvml_roof, spec_roof
    from llmrun.profiler.tuning import forget as forget_kernel_choices

    torch_device = resolve_device(device)
    wanted = tuple(d.strip().lower() for d in (dtype or "").split(",") if d.strip())
    allowed = P.CUDA_DTYPES if torch_device.type == "cuda" else ("fp32", "bf16", "fp16")
    for name in wanted:
        if name not in allowed:
            raise LlmrunError(f"--dtype {name!r}: on {torch_device.type} use one of {', '.join(allowed)}")
    if refresh:
        forget_kernel_choices()
    measured, _ = P.get(
        torch_device,
        tuple(dict.fromkeys((*P.default_dtypes(torch_device), *wanted))),
        refresh=refresh,
        on_measure=lambda name: Console(stderr=True).print(f"measuring {name}…", highlight=False),
    )
    nvml = nvml_roof(torch_device)
    name = str(nvml.detail.get("name", measured.device))
    specs = {d: spec_roof(name, d) for d in measured.flops} if torch_device.type == "cuda" else {}
    if as_json:
        print(
            json.dumps(
                {
                    "device": device_info(torch_device),
                    "cache": str(P.cache_path(torch_device)),
                    "measured": measured.to_json(),
                    "spec": {d: r.to_json() for d, r in specs.items()},
                    "nvml": {**nvml.to_json(), "detail": nvml.detail},
                },
                indent=2,
            )
        )
        return
    table = Table(title=f"roofs of {measured.device}", title_justify="left")
    for column in ("dtype", "measured GFLOP/s (median)", "spec GFLOP/s"):
        table.add_column(column, justify="left" if column == "dtype" else "right")
    for name_, flops in measured.flops.items():
        spec = specs.get(name_)
        spec_text = "—" if spec is None or spec.peak_flops is None else f"{spec.peak_flops / 1e9:.6g}"
        table.add_row(name_, f"{flops / 1e9:.6g} ({measured.median_flops.get(name_, 0) / 1e9:.6g})", spec_text)
    console = Console()
    console.print(table)
    detail = measured.detail
    console.print(
        f"memory bandwidth, measured: {measured.bytes_per_s / 1e9:.4g} GB/s (copy "
        f"{detail.get('copy_bytes_per_s', 0) / 1e9:.4g}, read {detail.get('read_bytes_per_s', 0) / 1e9:.4g})",
        highlight=False,
    )
    any_spec = next(iter(specs.values()), None)
    if any_spec is not None:
        bw = "—" if any_spec.peak_bytes_per_s is None else f"{any_spec.peak_bytes_per_s / 1e9:.4g} GB/s"
        console.print(f"memory bandwidth, spec: {bw} ({any_spec.note})", highlight=False)
    nvml_bw = "—" if nvml.peak_bytes_per_s is None else f"{nvml.peak_bytes_per_s / 1e9:.4g} GB/s"
    console.print(f"memory bandwidth, NVML: {nvml_bw} ({nvml.note})", highlight=False)
    console.print(_cache_line(measured, torch_device), highlight=False)


def _cache_line(measured, device) -> str:
    """Where the roofs were cached and when, or why they were not (``llmrun.profiler.peaks.measured_busy``)."""
    from llmrun.profiler import peaks as P

    detail = measured.detail
    if P.measured_busy(measured):
        return (
            f"not cached: other work took {detail['other_load']:.0%} of the CPU's time while measuring, so these "
            "roofs are low; measure again on a quiet machine"
        )
    return f"cached in {P.cache_path(device)} (measured {detail.get('measured_at')})"
