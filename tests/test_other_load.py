"""A measurement taken while other work held the CPU is used but not cached: ``OtherLoad`` tells."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from helpers import TINY

import llmrun.profiler.attention_tuning as A
import llmrun.profiler.quant_tuning as Q
import llmrun.profiler.timers as timers
import llmrun.profiler.tuning as T
from llmrun.jsonfiles import read_json_object
from llmrun.loading.presets import random_model
from llmrun.model.config import ModelArgs
from llmrun.model.quant import parse_quant, quantize_model
from llmrun.profiler.peaks import MeasuredPeaks, measured_busy
from llmrun.profiler.timers import BUSY_SOURCE, OtherLoad


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMRUN_HOME", str(tmp_path / "home"))
    for name in ("LLMRUN_CPU_GEMV", "LLMRUN_PREFILL_ATTENTION"):
        monkeypatch.delenv(name, raising=False)
    yield tmp_path / "home"
    timers.BUSY_CHOICES.clear()  # the busy choices made here serve no other test


class _Busy(OtherLoad):
    """An ``OtherLoad`` that always saw other work take half the machine."""

    def __exit__(self, *exc: object) -> None:
        self.share = 0.5


class _Quiet(OtherLoad):
    """An ``OtherLoad`` that always saw the machine to itself."""

    def __exit__(self, *exc: object) -> None:
        self.share = 0.0


def _model(dtype=torch.float32):
    args = ModelArgs.from_dict({**TINY, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}, source="tiny")
    return random_model(args, torch.device("cpu"), dtype)


def test_the_share_is_the_machines_busy_time_beyond_this_process(monkeypatch):
    window = timers.SHORTEST_WINDOW_S
    readings = iter([100.0, 100.0])
    monkeypatch.setattr(timers, "_machine_busy_s", lambda: next(readings))
    with OtherLoad() as quiet:
        time.sleep(window)
    assert quiet.share == 0.0 and not quiet.busy
    cpus = os.cpu_count() or 1
    readings = iter([100.0, 100.0 + window * cpus])  # every CPU busy all along, none of it this process's
    monkeypatch.setattr(timers, "_machine_busy_s", lambda: next(readings))
    with OtherLoad() as loaded:
        time.sleep(window)
    assert 0.5 < loaded.share <= 1.0 and loaded.busy
    readings = iter([100.0, 100.0 + window * cpus])
    with OtherLoad() as short:  # too short for the kernel's ticks: not judged
        time.sleep(window / 10)
    assert short.share == 0.0 and not short.busy
    monkeypatch.setattr(timers, "_machine_busy_s", lambda: None)  # no /proc/stat: nothing is known
    with OtherLoad() as unknown:
        time.sleep(0.01)
    assert unknown.share == 0.0 and not unknown.busy


@pytest.mark.skipif(not os.path.exists("/proc/stat") or (os.cpu_count() or 1) > 8, reason="Linux, a small machine")
def test_processes_spinning_on_every_cpu_make_the_machine_busy():
    spin = "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass"
    spinners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.3)  # the spinners are running
        with OtherLoad() as load:
            time.sleep(0.8)
    finally:
        for spinner in spinners:
            spinner.wait()
    assert load.busy, load.share


def test_a_busy_decode_kernel_measurement_is_used_but_not_cached(home, monkeypatch):
    monkeypatch.setattr(T, "OtherLoad", _Busy)
    model = _model()
    fake = {"mm": 3.0, "onednn": 2.0, "packed": 1.5, "conv": 1.0, "native": 4.0}
    calls = []

    def measure(model, kernels, batch):
        calls.append(kernels)
        return {k: fake[k] for k in kernels}

    first = T.choose_cpu_gemv(model, measure=measure)
    assert first.source == BUSY_SOURCE and not T.cache_path().exists()
    again = T.choose_cpu_gemv(model, measure=measure)
    assert again is first and len(calls) == 1  # the rest of this process reuses it, measuring nothing twice
    T.forget()  # as a new process (or `peaks --refresh`): measured again, and still not cached
    assert T.choose_cpu_gemv(model, measure=measure).source == BUSY_SOURCE and len(calls) == 2
    assert not T.cache_path().exists()


def test_a_busy_attention_measurement_is_used_but_not_cached(home, monkeypatch):
    monkeypatch.setattr(A, "OtherLoad", _Busy)
    calls = []

    def measure(attn, dtype, kernels):
        calls.append(kernels)
        return {"sdpa": [2.0, 2.0], "blocked": [1.0, 1.0]}

    model = _model()
    choice = A.choose_prefill_attention(model, measure=measure)
    assert (choice.kernel, choice.source) == ("blocked", BUSY_SOURCE) and not A.cache_path().exists()
    assert A.choose_prefill_attention(model, measure=measure) is choice and len(calls) == 1  # not twice


def test_a_busy_quantized_kernel_measurement_is_used_but_not_cached(home, monkeypatch):
    def tuned(load: type[OtherLoad]) -> tuple[dict, set]:
        Q.cache_path().unlink(missing_ok=True)
        model = _model()
        quantize_model(model, parse_quant("int8"))
        monkeypatch.setattr(Q, "OtherLoad", load)
        return Q.tune_quant(model), set(read_json_object(Q.cache_path())) - {"version"}

    chosen, kept = tuned(_Quiet)
    assert kept  # a quiet measurement is kept (the kinds with a choice to make)
    busy_chosen, busy_kept = tuned(_Busy)
    assert busy_chosen.keys() == chosen.keys() and not busy_kept  # a busy one serves this run only


def test_roofs_measured_busy_are_not_cached():
    peaks = MeasuredPeaks("cpu", "cpu", {"fp32": 1e9}, 1e9, {"fp32": 1e9}, {"other_load": 0.4})
    assert measured_busy(peaks)
    assert not measured_busy(MeasuredPeaks("cpu", "cpu", {"fp32": 1e9}, 1e9, {"fp32": 1e9}, {"other_load": 0.01}))
    assert not measured_busy(MeasuredPeaks("gpu", "cuda", {"bf16": 1e12}, 1e12, {"bf16": 1e12}, {}))  # not known
