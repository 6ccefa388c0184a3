"""Hardware roofs: the one ``Roofs`` type, its three sources (each labelled), and the choice.

* ``spec``: ``configs/hardware/gpus.json`` (vendor datasheets, dense figures, cited per entry),
  matched exactly to the name NVML (or torch) reports for the GPU.
* ``nvml``: theoretical memory bandwidth from NVML's max memory clock and bus width,
  clock (Hz) × bus width (bits) / 8 × 2 (double data rate); NVML gives no FLOP/s. Without an
  NVIDIA driver (or without ``pynvml``) this source is skipped with a note.
* ``measured``: ``llmrun.profiler.peaks`` (GEMM per dtype, large copy), cached per device.

``select_roofs`` picks the roofs the percentages divide by: measured by default, or the source
asked for, with ``--peak-flops`` / ``--peak-bandwidth`` overriding either number. ``Roofs``
holds the speed-of-light rule that info, bench and the roofline rows share (docs/roofline.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmrun.errors import LlmrunError
from llmrun.jsonfiles import read_json_object
from llmrun.paths import configs_dir
from llmrun.profiler import peaks

SOURCES = ("measured", "spec", "nvml")
MEASURE = ("cached", "missing", "fallback", "again")
"""When ``select_roofs`` measures: never (the cache only), what the cache lacks, only when no source
knows both roofs, or anew."""


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
    """The roofs a report divides by: peak FLOP/s in the profiled dtype and main-memory bytes/s,
    where they came from (``source``), and every source seen (``candidates``)."""

    peak_flops: float
    peak_bytes_per_s: float
    source: str
    candidates: list[Roof] = field(default_factory=list)

    @property
    def ridge(self) -> float:
        """Intensity (FLOP/byte) where the bandwidth roof meets the compute roof."""
        return self.peak_flops / self.peak_bytes_per_s

    def light_s(self, flops: float, nbytes: float) -> float:
        """Speed of light in seconds of work of ``flops`` FLOPs moving ``nbytes`` bytes: the slower roof,
        max(flops / peak_flops, nbytes / peak_bytes_per_s). A lower bound on time, never a prediction."""
        return max(flops / self.peak_flops, nbytes / self.peak_bytes_per_s)

    def bound(self, flops: float, nbytes: float) -> str:
        """The roof that binds that work: ``compute`` if its intensity flops/nbytes reaches the ridge, else
        ``memory`` (the roof of the larger term of ``light_s``)."""
        intensity = flops / nbytes if nbytes else 0.0
        return "compute" if intensity >= self.ridge else "memory"

    def to_json(self, *, detail: bool = True) -> dict:
        """``peak_flops``, ``peak_bytes_per_s`` and ``source`` (info's and bench's ``roofs``); with
        ``detail`` also ``ridge`` and ``sources`` (the profile report's ``roofs``)."""
        chosen = {"peak_flops": self.peak_flops, "peak_bytes_per_s": self.peak_bytes_per_s, "source": self.source}
        if not detail:
            return chosen
        return {**chosen, "ridge": self.ridge, "sources": [c.to_json() for c in self.candidates]}


def table_path() -> Path:
    """The spec table: ``$LLMRUN_HARDWARE_TABLE``, else ``configs/hardware/gpus.json`` shipped with the package."""
    env = os.environ.get("LLMRUN_HARDWARE_TABLE")
    return Path(env) if env else configs_dir() / "hardware" / "gpus.json"


def load_table(path: Path | None = None) -> list[dict]:
    """The GPU entries of the spec table (empty when the file is absent)."""
    path = path or table_path()
    if not path.is_file():
        return []
    gpus = read_json_object(path, fix="fix or remove the hardware table").get("gpus")
    if not isinstance(gpus, list) or not all(isinstance(entry, dict) for entry in gpus):
        raise LlmrunError(f"{path} is not a valid hardware table (no 'gpus' list of objects); fix or remove it")
    return gpus


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


def spec_gpu(name: str, dtype: str) -> tuple[Roofs, dict]:
    """(datasheet roofs, table entry) of the GPU called ``name`` (its table ``name`` or an NVML name), for
    predictions about a GPU not present (``llmrun info --gpu``); an unknown name lists the known ones."""
    wanted = _normal(name)
    for entry in load_table():
        if wanted == _normal(entry.get("name", "")) or any(_normal(n) == wanted for n in entry.get("nvml_names", [])):
            flops = entry["flops"].get(dtype)
            if flops is None:
                raise LlmrunError(f"{entry['name']} lists no {dtype} FLOP/s in {table_path().name}")
            roof = Roof("spec", flops, entry["bytes_per_s"], f"{entry['name']}: {entry['source']}")
            return Roofs(flops, entry["bytes_per_s"], "spec", [roof]), entry
    known = ", ".join(entry.get("name", "?") for entry in load_table())
    raise LlmrunError(f"--gpu {name!r} is not in {table_path().name}; known GPUs: {known}")


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


def measured_roof(
    device: torch.device, dtype: str, *, measure: str = "missing", on_measure: Callable[[str], None] | None = None
) -> Roof:
    """Measured roofs for ``dtype``: from the cache only (``measure="cached"``), after measuring what
    the cache lacks (``"missing"``), or measured anew (``"again"``); what is measured is cached.

    ``on_measure`` gets the device's name just before anything is measured (seconds of GEMMs and
    copies; see ``llmrun.profiler.peaks.get``).
    """
    if measure == "cached":
        result, fresh = peaks.load_cached(device), False
        if result is None:
            return Roof("measured", None, None, "not measured yet: run 'llmrun peaks'")
    else:
        result, fresh = peaks.get(device, (dtype,), refresh=measure == "again", on_measure=on_measure)
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
    measure: str = "missing",
    on_measure: Callable[[str], None] | None = None,
) -> Roofs:
    """Gather every source and choose: ``prefer``'s numbers, each overridable by the explicit ones.

    ``dtype`` names the profiled math (bf16, fp16, fp32). A missing number in the preferred source
    is taken from the next source that has it (measured, spec, nvml), and ``source`` says so; a
    preferred source with no number at all on this device is an ``LlmrunError`` unless both numbers
    are given.
    ``measure`` (one of ``MEASURE``) says when to run the microbenchmarks: ``missing`` (profile,
    bench) measures what the cache lacks, ``fallback`` (info) only when no source knows both roofs,
    ``again`` anew, ``cached`` never; nothing is measured for roofs that are not divided by (another
    source preferred, or both numbers given). ``on_measure`` as in ``measured_roof``.
    """
    if prefer not in SOURCES:
        raise LlmrunError(f"--roofs {prefer!r} is not a source; use one of {', '.join(SOURCES)}")
    if measure not in MEASURE:
        raise ValueError(f"measure={measure!r}: use one of {', '.join(MEASURE)}")
    if prefer != "measured" or (peak_flops is not None and peak_bandwidth is not None):
        measure = "cached"
    nvml = nvml_roof(device)
    if device.type == "cuda":
        spec = spec_roof(str(nvml.detail.get("name", peaks.device_name(device))), dtype)
    else:
        spec = Roof("spec", None, None, "skipped: the spec table lists GPUs only")
    if peak_flops is None or peak_bandwidth is None:
        _check_preferred(device, prefer, [spec, nvml])
    first = "cached" if measure == "fallback" else measure
    candidates = {"measured": measured_roof(device, dtype, measure=first, on_measure=on_measure)}
    candidates |= {"spec": spec, "nvml": nvml}
    try:
        return _choose(device, dtype, candidates, prefer, peak_flops, peak_bandwidth)
    except LlmrunError:
        if measure != "fallback":
            raise
    candidates["measured"] = measured_roof(device, dtype, measure="missing", on_measure=on_measure)
    return _choose(device, dtype, candidates, prefer, peak_flops, peak_bandwidth)


def _check_preferred(device: torch.device, prefer: str, others: list[Roof]) -> None:
    """``LlmrunError`` when ``prefer``, one of the sources ``others`` (spec, nvml), has no figure at
    all on ``device``: its percentages would silently be another source's. Measured roofs can
    always be measured, so they never fail here."""
    known = {roof.source: roof for roof in others}
    roof = known.get(prefer)
    if roof is None or roof.peak_flops is not None or roof.peak_bytes_per_s is not None:
        return
    having = ["measured"] + [r.source for r in others if r.peak_flops is not None or r.peak_bytes_per_s is not None]
    raise LlmrunError(
        f"--roofs {prefer}: that source has no figures for {peaks.device_name(device)} ({roof.note}); "
        f"use --roofs {' or '.join(having)}, or pass --peak-flops and --peak-bandwidth"
    )


def _choose(
    device: torch.device,
    dtype: str,
    candidates: dict[str, Roof],
    prefer: str,
    peak_flops: float | None,
    peak_bandwidth: float | None,
) -> Roofs:
    """Each roof from the override, else from the first source in ``prefer``-first order that has it."""
    order = [prefer, *(s for s in SOURCES if s != prefer)]
    flops, flops_src = _first(candidates, order, "peak_flops", peak_flops)
    bandwidth, bw_src = _first(candidates, order, "peak_bytes_per_s", peak_bandwidth)
    if flops is None or bandwidth is None:
        missing = "--peak-flops" if flops is None else "--peak-bandwidth"
        name = peaks.device_name(device)
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
