"""Hardware roofs (``llmrun.profiler.roofs``): the spec table, NVML (present, absent, failing), measured peaks
and their cache, the choice, and the speed-of-light rule of ``Roofs``."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from llmrun.cli.app import run
from llmrun.errors import LlmrunError
from llmrun.profiler import peaks
from llmrun.profiler.roofs import Roofs, load_table, match_spec, nvml_roof, select_roofs, spec_roof
from llmrun.profiler.timers import time_calls

CPU = torch.device("cpu")
REQUIRED = {
    "A100 40GB SXM": "NVIDIA A100-SXM4-40GB",
    "A100 80GB SXM": "NVIDIA A100-SXM4-80GB",
    "H100 SXM": "NVIDIA H100 80GB HBM3",
    "H100 PCIe": "NVIDIA H100 PCIe",
    "H200 SXM": "NVIDIA H200",
    "L4": "NVIDIA L4",
    "L40S": "NVIDIA L40S",
    "GeForce RTX 4090": "NVIDIA GeForce RTX 4090",
}


@pytest.fixture(autouse=True)
def own_home(tmp_path, monkeypatch):
    """Every test gets an empty llmrun cache, so no measured roofs leak in or out."""
    monkeypatch.setenv("LLMRUN_HOME", str(tmp_path))


def test_spec_table_covers_the_required_gpus_with_cited_dense_figures():
    table = load_table()
    names = {entry["name"] for entry in table}
    assert set(REQUIRED) <= names
    for entry in table:
        assert set(entry["flops"]) == {"bf16", "fp16", "fp32", "tf32"}, entry["name"]
        assert entry["source"] and entry["nvml_names"]
        assert 1e11 < entry["bytes_per_s"] < 1e13
        assert entry["flops"]["bf16"] >= entry["flops"]["tf32"] >= entry["flops"]["fp32"] / 2 > 0
    all_names = [n.lower() for entry in table for n in entry["nvml_names"]]
    assert len(all_names) == len(set(all_names))  # exact names never match two entries


def test_spec_matching_is_exact():
    for name, nvml_name in REQUIRED.items():
        assert match_spec(nvml_name)["name"] == name
    assert match_spec("nvidia  h200")["name"] == "H200 SXM"  # case and spacing ignored
    assert match_spec("NVIDIA H200 NVL")["name"] == "H200 NVL"  # not the SXM part
    assert match_spec("NVIDIA H2000") is None
    roof = spec_roof("NVIDIA H100 80GB HBM3", "bf16")
    assert (roof.peak_flops, roof.peak_bytes_per_s) == (989.4e12, 3.35e12)
    assert "datasheet" in roof.note
    assert spec_roof("Some GPU", "bf16").peak_flops is None


def test_nvml_on_cpu_and_without_a_driver_is_a_note(monkeypatch):
    assert nvml_roof(CPU).note == "skipped: not a CUDA device"
    fake = types.ModuleType("pynvml")

    def no_driver():
        raise RuntimeError("NVML Shared Library Not Found")

    fake.nvmlInit = no_driver
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    roof = nvml_roof(torch.device("cuda", 0))
    assert roof.peak_bytes_per_s is None and roof.note.startswith("skipped: no NVIDIA driver")
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed
    assert "not installed" in nvml_roof(torch.device("cuda", 0)).note


def test_nvml_bandwidth_from_memory_clock_and_bus_width(monkeypatch):
    """An H200 reports 3201 MHz memory clock (NVML_CLOCK_MEM) and a 6144-bit bus: ~4.9 TB/s."""
    fake = types.ModuleType("pynvml")
    fake.NVML_CLOCK_MEM, fake.NVML_CLOCK_SM = 2, 1
    fake.NVMLError = RuntimeError
    fake.nvmlInit = fake.nvmlShutdown = lambda: None
    fake.nvmlDeviceGetHandleByPciBusId = fake.nvmlDeviceGetHandleByIndex = lambda _: "h"
    fake.nvmlDeviceGetName = lambda h: "NVIDIA H200"
    fake.nvmlDeviceGetMaxClockInfo = lambda h, clock: {2: 3201, 1: 1980}[clock]
    fake.nvmlDeviceGetMemoryBusWidth = lambda h: 6144
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    props = types.SimpleNamespace(multi_processor_count=132, pci_bus_id=0x19, pci_domain_id=0, pci_device_id=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    roof = nvml_roof(torch.device("cuda", 0))
    assert roof.peak_bytes_per_s == 3201e6 * 6144 / 8 * 2
    assert roof.peak_flops is None
    assert roof.detail["name"] == "NVIDIA H200" and roof.detail["sms"] == 132


def fake_peaks(flops=None, bandwidth=2e10) -> peaks.MeasuredPeaks:
    return peaks.MeasuredPeaks(peaks.device_name(CPU), "cpu", flops or {"fp32": 1e11, "bf16": 3e11}, bandwidth)


def test_peaks_cache_round_trip_and_version():
    assert peaks.load_cached(CPU) is None
    path = peaks.save(fake_peaks(), CPU)
    assert peaks.load_cached(CPU) == fake_peaks()
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "version": 0}))
    assert peaks.load_cached(CPU) is None  # an old cache is measured again, not misread
    path.write_text("{broken")
    assert peaks.load_cached(CPU) is None


def test_peaks_get_measures_only_what_the_cache_lacks(monkeypatch):
    calls = []

    def fake_measure(device, dtypes=None, repeats=10, *, bandwidth=True):
        calls.append((dtypes, bandwidth))
        return peaks.MeasuredPeaks("x", "cpu", dict.fromkeys(dtypes, 5e9), 1e10 if bandwidth else 0.0, detail={})

    monkeypatch.setattr(peaks, "measure", fake_measure)
    first, fresh = peaks.get(CPU)
    assert fresh and calls == [(("fp32", "bf16"), True)]
    again, fresh = peaks.get(CPU, ("fp32",))
    assert not fresh and again.flops == first.flops and len(calls) == 1
    merged, fresh = peaks.get(CPU, ("fp16",))
    assert fresh and calls[-1] == (("fp16",), False)
    assert set(merged.flops) == {"fp32", "bf16", "fp16"} and merged.bytes_per_s == 1e10
    assert set(peaks.load_cached(CPU).flops) == {"fp32", "bf16", "fp16"}
    fresh, _ = peaks.get(CPU, ("fp32",), refresh=True)  # only what is asked for: bf16 can take minutes
    assert calls[-1] == (("fp32",), True) and set(fresh.flops) == {"fp32"}


def test_select_roofs_prefers_measured_and_honours_overrides():
    peaks.save(fake_peaks(), CPU)
    roofs = select_roofs(CPU, "bf16", measure="cached")
    assert (roofs.peak_flops, roofs.peak_bytes_per_s, roofs.source) == (3e11, 2e10, "measured")
    assert roofs.ridge == 15
    assert [c.source for c in roofs.candidates] == ["measured", "spec", "nvml"]
    one = select_roofs(CPU, "bf16", peak_bandwidth=1e10, measure="cached")
    assert (one.peak_flops, one.peak_bytes_per_s) == (3e11, 1e10)
    assert one.source == "flops: measured, bandwidth: override"
    both = select_roofs(CPU, "fp16", peak_flops=1.0, peak_bandwidth=2.0, measure="cached")
    assert both.source == "override"


def test_select_roofs_without_any_source_says_what_to_do():
    with pytest.raises(LlmrunError, match="run 'llmrun peaks' or pass --peak-flops"):
        select_roofs(CPU, "fp32", measure="cached")
    with pytest.raises(LlmrunError, match="--roofs 'guess'"):
        select_roofs(CPU, "fp32", prefer="guess")


def test_select_roofs_measures_when_told(monkeypatch):
    calls, notes = [], []

    def fake_measure(device, dtypes=None, repeats=10, *, bandwidth=True):
        calls.append(dtypes)
        return peaks.MeasuredPeaks("x", "cpu", dict.fromkeys(dtypes, 5e9), 1e10 if bandwidth else 0.0, detail={})

    monkeypatch.setattr(peaks, "measure", fake_measure)
    with pytest.raises(LlmrunError, match="no roof known"):
        select_roofs(CPU, "bf16", measure="cached", on_measure=notes.append)
    assert select_roofs(CPU, "bf16", peak_flops=1.0, peak_bandwidth=2.0, measure="again").source == "override"
    assert calls == [] and notes == []  # given both roofs, nothing is measured
    roofs = select_roofs(CPU, "bf16", measure="fallback", on_measure=notes.append)  # no other source on a CPU
    assert (roofs.peak_flops, roofs.source, notes) == (5e9, "measured", [peaks.device_name(CPU)])
    assert select_roofs(CPU, "bf16", measure="fallback").source == "measured" and len(calls) == 1  # cached
    select_roofs(CPU, "fp16", on_measure=notes.append)  # "missing": the cache lacks fp16
    assert calls[-1] == ("fp16",) and len(notes) == 2
    select_roofs(CPU, "fp16", measure="again")
    assert len(calls) == 3
    with pytest.raises(ValueError, match="measure='sometimes'"):
        select_roofs(CPU, "fp16", measure="sometimes")


def test_roofs_speed_of_light_is_the_slower_roof():
    roofs = Roofs(1e12, 1e11, "test")  # ridge 10 FLOP/byte
    assert (roofs.light_s(1e12, 1e10), roofs.bound(1e12, 1e10)) == (1.0, "compute")
    assert (roofs.light_s(1e9, 1e11), roofs.bound(1e9, 1e11)) == (1.0, "memory")
    assert roofs.bound(10.0, 1.0) == "compute"  # on the ridge: both roofs bind, compute is named
    assert roofs.to_json(detail=False) == {"peak_flops": 1e12, "peak_bytes_per_s": 1e11, "source": "test"}
    assert roofs.to_json() == {**roofs.to_json(detail=False), "ridge": 10.0, "sources": []}


def test_a_broken_spec_table_is_one_clear_error(tmp_path, monkeypatch):
    table = tmp_path / "gpus.json"
    monkeypatch.setenv("LLMRUN_HARDWARE_TABLE", str(table))
    assert load_table() == []  # absent: no spec roofs, not an error
    table.write_text('{"gpus": 3}')
    with pytest.raises(LlmrunError, match="is not a valid hardware table"):
        load_table()
    table.write_text("{")
    with pytest.raises(LlmrunError, match="fix or remove the hardware table"):
        load_table()


def test_time_calls_warms_up_once():
    calls = []
    times = time_calls(lambda: calls.append(1), CPU, 3)
    assert len(calls) == 4 and len(times) == 3 and all(t >= 0 for t in times)


def test_measure_runs_real_microbenchmarks_quickly():
    measured = peaks.measure(CPU, ("fp32",), repeats=1)
    assert measured.flops["fp32"] > 1e8 and measured.bytes_per_s > 1e8
    assert set(measured.detail["gemm_n"]) == {"fp32"}
    assert measured.detail["copy_bytes_per_s"] <= measured.bytes_per_s


def test_peaks_cli_json_uses_the_cache(capsys):
    peaks.save(fake_peaks(), CPU)
    assert run(["peaks", "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["measured"]["flops"] == {"fp32": 1e11, "bf16": 3e11}
    assert out["nvml"]["note"] == "skipped: not a CUDA device"
    assert run(["peaks", "--device", "cpu"]) == 0
    assert "fp32" in capsys.readouterr().out
    assert run(["peaks", "--device", "cpu", "--dtype", "tf32"]) == 2
    assert "--dtype 'tf32'" in capsys.readouterr().err


def test_a_slow_cpu_dtype_gets_a_smaller_gemm(monkeypatch):
    """One 256-cube product timed at 0.1 s: a 2048-cube one would take 51 s, a 512-cube one 0.8 s."""
    clock = iter([0.0, 0.1])
    monkeypatch.setattr(peaks.time, "perf_counter", lambda: next(clock))
    assert peaks._cpu_gemm_n(torch.float32) == 512
    fast = iter([0.0, 1e-4])
    monkeypatch.setattr(peaks.time, "perf_counter", lambda: next(fast))
    assert peaks._cpu_gemm_n(torch.float32) == peaks.CPU_GEMM_N
