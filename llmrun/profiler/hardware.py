"""Hardware roofs from three sources, each labelled: the spec table, NVML, and measured peaks.

* ``spec``: ``configs/hardware/gpus.json`` (vendor datasheets, dense figures, cited per entry),
  matched exactly to the name NVML (or torch) reports for the GPU.
* ``nvml``: theoretical memory bandwidth from NVML's max memory clock and bus width,
  clock (Hz) × bus width (bits) / 8 × 2 (double data rate); NVML gives no FLOP/s. Without an
  NVIDIA driver (or without ``pynvml``) this source is skipped with a note.
* ``measured``: ``llmrun.profiler.peaks`` (GEMM per dtype, large copy), cached per device.

``select_roofs`` picks the roofs the percentages divide by: measured by default, or the source
asked for, with ``--peak-flops`` / ``--peak-bandwidth`` overriding either number.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmrun.errors import LlmrunError
from llmrun.paths import configs_dir
from llmrun.profiler import peaks

SOURCES = ("measured", "spec", "nvml")


@dataclass
class Roof:
    """One source's roofs: FLOP/s for the profiled dtype and main-memory bytes/s (None: unknown)."""

    source: str
    peak_flops: float | None
    peak_bytes_per_s: float | None
    note: str = ""
    detail: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> dict:
        """The JSON form (``sources`` entries of the report's ``roofs``)."""
        return {
            "source": self.source,
            "peak_flops": self.peak_flops,
            "peak_bytes_per_s": self.peak_bytes_per_s,
            "note": self.note,
        }


@dataclass
class Roofs:
    """The roofs the report divides by, where each came from, and every source seen."""

    peak_flops: float
    peak_bytes_per_s: float
    source: str
    candidates: list[Roof]

    @property
    def ridge(self) -> float:
        """Intensity (FLOP/byte) where the bandwidth roof meets the compute roof."""
        return self.peak_flops / self.peak_bytes_per_s

    def to_json(self) -> dict:
        """``roofs`` of the report: the contract's fields plus ``ridge`` and ``sources``."""
        return {
            "peak_flops": self.peak_flops,
            "peak_bytes_per_s": self.peak_bytes_per_s,
            "source": self.source,
            "ridge": self.ridge,
            "sources": [c.to_json() for c in self.candidates],
        }


def table_path() -> Path:
    """The spec table: ``$LLMRUN_HARDWARE_TABLE``, else ``configs/hardware/gpus.json`` shipped with the package."""
    env = os.environ.get("LLMRUN_HARDWARE_TABLE")
    return Path(env) if env else configs_dir() / "hardware" / "gpus.json"


def load_table(path: Path | None = None) -> list[dict]:
    """The GPU entries of the spec table (empty when the file is absent)."""
    path = path or table_path()
    if not path.is_file():
        return []
    try:
        return json.loads(path.read_text(encoding="utf-8"))["gpus"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise LlmrunError(f"{path} is not a valid hardware table ({exc}); fix or remove it") from None


def _normal(name: str) -> str:
    return " ".join(name.lower().split())


def match_spec(name: str, table: list[dict] | None = None) -> dict | None:
    """The table entry whose ``nvml_names`` holds ``name`` exactly (ignoring case and spacing), or None."""
    wanted = _normal(name)
    for entry in load_table() if table is None else table:
        if any(_normal(n) == wanted for n in entry.get("nvml_names", [])):
            return entry
    return None


def spec_roof(name: str, dtype: str, table: list[dict] | None = None) -> Roof:
    """The spec-sheet roofs of the GPU called ``name`` for ``dtype`` (bf16, fp16, fp32, tf32)."""
    entry = match_spec(name, table)
    if entry is None:
        return Roof("spec", None, None, f"no entry for {name!r} in {table_path().name}")
    return Roof("spec", entry["flops"].get(dtype), entry["bytes_per_s"], f"{entry['name']}: {entry['source']}")


def nvml_roof(device: torch.device) -> Roof:
    """Theoretical bandwidth and clocks from NVML; a note instead of numbers when NVML is unusable."""
    if device.type != "cuda":
        return Roof("nvml", None, None, "skipped: not a CUDA device")
    try:
        import pynvml
    except ImportError:
        return Roof("nvml", None, None, "skipped: pynvml (nvidia-ml-py) is not installed")
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        return Roof("nvml", None, None, f"skipped: no NVIDIA driver ({type(exc).__name__})")
    try:
        handle = _nvml_handle(pynvml, device)
        name = pynvml.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else name
        mem_mhz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
        bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(handle)
        sm_mhz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM)
    except Exception as exc:
        return Roof("nvml", None, None, f"skipped: NVML query failed ({type(exc).__name__}: {exc})")
    finally:
        pynvml.nvmlShutdown()
    bandwidth = mem_mhz * 1e6 * bus_bits / 8 * 2
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    detail = {"name": name, "mem_clock_mhz": mem_mhz, "bus_width_bits": bus_bits, "sm_clock_mhz": sm_mhz, "sms": sms}
    note = f"{name}: {mem_mhz} MHz x {bus_bits} bit x 2 (DDR); max SM clock {sm_mhz} MHz, {sms} SMs"
    return Roof("nvml", None, bandwidth, note, detail)


def _nvml_handle(pynvml, device: torch.device):
    """The NVML handle of a torch CUDA device, by PCI bus id (CUDA and NVML orders can differ)."""
    props = torch.cuda.get_device_properties(device)
    bus_id = getattr(props, "pci_bus_id", None)
    if bus_id is not None:
        domain, slot = getattr(props, "pci_domain_id", 0), getattr(props, "pci_device_id", 0)
        try:
            return pynvml.nvmlDeviceGetHandleByPciBusId(f"{domain:08x}:{bus_id:02x}:{slot:02x}.0")
        except pynvml.NVMLError:
            pass
    return pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)


def measured_roof(device: torch.device, dtype: str, *, measure: bool = True) -> Roof:
    """Measured roofs for ``dtype`` from the cache, measuring (and caching) them first if ``measure``."""
    if measure:
        result, fresh = peaks.get(device, (dtype,))
    else:
        result, fresh = peaks.load_cached(device), False
        if result is None:
            return Roof("measured", None, None, "not measured yet: run 'llmrun peaks'")
    when = "measured just now" if fresh else f"cached {peaks.cache_path(device)}"
    flops = result.flops.get(dtype)
    note = f"{result.device}: GEMM best of {result.detail.get('repeats')} and large copy/sum; {when}"
    if flops is None:
        note += f"; no {dtype} GEMM measured"
    return Roof("measured", flops, result.bytes_per_s, note, dict(result.detail))


def device_info(device: torch.device) -> dict[str, str]:
    """``device`` of the report: {name, kind}."""
    return {"name": peaks.device_name(device), "kind": device.type}


def select_roofs(
    device: torch.device,
    dtype: str,
    *,
    prefer: str = "measured",
    peak_flops: float | None = None,
    peak_bandwidth: float | None = None,
    measure: bool = True,
) -> Roofs:
    """Gather every source and choose: ``prefer``'s numbers, each overridable by the explicit ones.

    ``dtype`` names the profiled math (bf16, fp16, fp32). A missing number in the preferred source
    is taken from the next source that has it (measured, spec, nvml), and ``source`` says so.
    """
    if prefer not in SOURCES:
        raise LlmrunError(f"--roofs {prefer!r} is not a source; use one of {', '.join(SOURCES)}")
    name = peaks.device_name(device)
    need_measured = measure and (peak_flops is None or peak_bandwidth is None) and prefer == "measured"
    nvml = nvml_roof(device)
    if device.type == "cuda":
        spec = spec_roof(str(nvml.detail.get("name", name)), dtype)
    else:
        spec = Roof("spec", None, None, "skipped: the spec table lists GPUs only")
    candidates = {"measured": measured_roof(device, dtype, measure=need_measured), "spec": spec, "nvml": nvml}
    order = [prefer, *(s for s in SOURCES if s != prefer)]
    flops, flops_src = _first(candidates, order, "peak_flops", peak_flops)
    bandwidth, bw_src = _first(candidates, order, "peak_bytes_per_s", peak_bandwidth)
    if flops is None or bandwidth is None:
        missing = "--peak-flops" if flops is None else "--peak-bandwidth"
        raise LlmrunError(f"no roof known for {name} ({dtype}); run 'llmrun peaks' or pass {missing}")
    source = flops_src if flops_src == bw_src else f"flops: {flops_src}, bandwidth: {bw_src}"
    return Roofs(flops, bandwidth, source, list(candidates.values()))


def _first(candidates: dict[str, Roof], order: list[str], attr: str, override: float | None) -> tuple:
    if override is not None:
        return override, "override"
    for source in order:
        value = getattr(candidates[source], attr)
        if value is not None:
            return value, source
    return None, None
