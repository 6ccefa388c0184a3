"""The CPU decode kernel is the one measured fastest on this machine (fake timings pin the choice)."""

from __future__ import annotations

import pytest
import torch

import llmrun.profiler.tuning as T
from llmrun.loading.loader import load_model
from llmrun.model.executor import decode_step, make_cache, prefill
from llmrun.model.fastpath import fast_decoder
from llmrun.model.fastpath.gemv import onednn_supported

pytestmark = pytest.mark.skipif(not onednn_supported(torch.float32), reason="needs oneDNN for the candidates")


@pytest.fixture
def model(tiny_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMRUN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LLMRUN_CPU_GEMV", raising=False)
    return load_model(tiny_factory("llama", num_key_value_heads=2), torch.device("cpu"), torch.float32, progress=False)


def _fake(seconds: dict[str, float], calls: list):
    def measure(model, kernels, batch):
        calls.append(list(kernels))
        return {k: seconds[k] for k in kernels}

    return measure


def test_the_measured_winner_is_chosen_cached_and_used_by_the_fast_path(model):
    calls = []
    timings = {"mm": 3.0, "onednn": 2.0, "packed": 1.5, "conv": 1.0, "native": 4.0}
    choice = T.choose_cpu_gemv(model, measure=_fake(timings, calls))
    assert (choice.kernel, choice.source) == ("conv", "measured")
    assert calls == [[k for k in timings if T.available(k, torch.float32)]]  # native where it is built
    again = T.choose_cpu_gemv(model, measure=_fake({**timings, "conv": 9.0}, calls))
    assert (again.kernel, again.source, len(calls)) == ("conv", "cached", 1)  # not measured twice
    faster_mm = T.choose_cpu_gemv(model, refresh=True, measure=_fake({**timings, "mm": 0.5}, calls))
    assert (faster_mm.kernel, faster_mm.source) == ("mm", "measured")
    T.tune_decode(model)
    cache = make_cache(model, 1, 8)
    prefill(model, torch.tensor([[1, 2, 3]]), cache)
    decode_step(model, torch.tensor([4]), cache)
    assert fast_decoder(model, cache).gemv == model.decode_gemv == "mm"


def test_a_copying_kernel_is_not_chosen_when_its_copy_does_not_fit(model, monkeypatch):
    monkeypatch.setattr(T, "available_memory", lambda: 1000)  # bytes: far less than the weights
    timings = {"mm": 3.0, "onednn": 2.0, "packed": 1.5, "conv": 1.0, "native": 4.0}
    choice = T.choose_cpu_gemv(model, measure=_fake(timings, []))
    assert choice.kernel == "onednn" and "does not fit" in choice.note


def test_the_environment_variable_overrides_the_measurement(model, monkeypatch):
    monkeypatch.setenv("LLMRUN_CPU_GEMV", "packed")
    choice = T.choose_cpu_gemv(model, measure=_fake({}, []))  # would fail if it measured
    assert (choice.kernel, choice.source) == ("packed", "LLMRUN_CPU_GEMV")


def test_the_real_measurement_times_every_candidate(model):
    seconds = T.measure_passes(model, ["mm", "conv"], 1)
    assert set(seconds) == {"mm", "conv"} and all(s > 0 for s in seconds.values())


def test_nothing_is_measured_when_the_fast_path_is_off(model, monkeypatch):
    monkeypatch.setenv("LLMRUN_FAST", "0")
    assert T.tune_decode(model) is None and model.decode_gemv is None
    assert not T.cache_path().exists()


def test_a_corrupt_cache_is_measured_again_and_rewritten(model):
    T.cache_path().parent.mkdir(parents=True)
    T.cache_path().write_text("garbage{")  # a file of the right name, the wrong content
    choice = T.choose_cpu_gemv(
        model, measure=_fake({"mm": 3.0, "onednn": 2.0, "packed": 1.5, "conv": 1.0, "native": 4.0}, [])
    )
    assert (choice.kernel, choice.source) == ("conv", "measured")
    assert T.choose_cpu_gemv(model, measure=_fake({}, [])).source == "cached"  # rewritten whole
