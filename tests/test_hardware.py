"""Hardware roofs: the spec table, NVML (present, absent, failing), measured peaks and their cache, the choice."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from llmrun.cli.app import run
from llmrun.errors import LlmrunError
from llmrun.profiler import hardware, peaks

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
    table = hardware.load_table()
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
        assert hardware.match_spec(nvml_name)["name"] == name
    assert hardware.match_spec("nvidia  h200")["name"] == "H200 SXM"  # case and spacing ignored
    assert hardware.match_spec("NVIDIA H200 NVL")["name"] == "H200 NVL"  # not the SXM part
    assert hardware.match_spec("NVIDIA H2000") is None
    roof = hardware.spec_roof("NVIDIA H100 80GB HBM3", "bf16")
    assert (roof.peak_flops, roof.peak_bytes_per_s) == (989.4e12, 3.35e12)
    assert "datasheet" in roof.note
    assert hardware.spec_roof("Some GPU", "bf16").peak_flops is None


def test_nvml_on_cpu_and_without_a_driver_is_a_note(monkeypatch):
    assert hardware.nvml_roof(CPU).note == "skipped: not a CUDA device"
    fake = types.ModuleType("pynvml")

    def no_driver():
        raise RuntimeError("NVML Shared Library Not Found")

    fake.nvmlInit = no_driver
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    roof = hardware.nvml_roof(torch.device("cuda", 0))
    assert roof.peak_bytes_per_s is None and roof.note.startswith("skipped: no NVIDIA driver")
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed
    assert "not installed" in hardware.nvml_roof(torch.device("cuda", 0)).note


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
    roof = hardware.nvml_roof(torch.device("cuda", 0))
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


def test_select_roofs_prefers_measured_and_honours_overrides():
    peaks.save(fake_peaks(), CPU)
    roofs = hardware.select_roofs(CPU, "bf16", measure=False)
    assert (roofs.peak_flops, roofs.peak_bytes_per_s, roofs.source) == (3e11, 2e10, "measured")
    assert roofs.ridge == 15
    assert [c.source for c in roofs.candidates] == ["measured", "spec", "nvml"]
    one = hardware.select_roofs(CPU, "bf16", peak_bandwidth=1e10, measure=False)
    assert (one.peak_flops, one.peak_bytes_per_s) == (3e11, 1e10)
    assert one.source == "flops: measured, bandwidth: override"
    both = hardware.select_roofs(CPU, "fp16", peak_flops=1.0, peak_bandwidth=2.0, measure=False)
    assert both.source == "override"


def test_select_roofs_without_any_source_says_what_to_do():
    with pytest.raises(LlmrunError, match="run 'llmrun peaks' or pass --peak-flops"):
        hardware.select_roofs(CPU, "fp32", measure=False)
    with pytest.raises(LlmrunError, match="--roofs 'guess'"):
        hardware.select_roofs(CPU, "fp32", prefer="guess")


def test_measure_runs_real_microbenchmarks_quickly():
    measured = peaks.measure(CPU, ("fp32",), repeats=1)
    assert measured.flops["fp32"] > 1e8 and measured.bytes_per_s > 1e8
    assert measured.detail["gemm_n"] == {"fp32": 2048}
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
