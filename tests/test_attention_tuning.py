"""CPU prefill's attention kernel is the one measured fastest on this machine (fake timings pin the choice),
and the two kernels it chooses between give the same prefill."""

from __future__ import annotations

import json

import pytest
import torch
from badinputs import check_one_line, gen

import llmrun.model.attention
import llmrun.profiler.attention_tuning as A
from llmrun.cli.app import run
from llmrun.loading.loader import load_model
from llmrun.model.executor import forward, make_cache
from llmrun.profiler.tuning import forget, tune_decode


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMRUN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LLMRUN_PREFILL_ATTENTION", raising=False)
    return tmp_path / "home"


@pytest.fixture
def model(tiny_factory, home):
    return load_model(tiny_factory("llama", num_key_value_heads=2), torch.device("cpu"), torch.float32, progress=False)


def _fake(seconds: dict[str, list[float]], calls: list):
    def measure(attention, dtype, kernels):
        calls.append((attention.n_heads, attention.n_kv_heads, attention.head_dim, dtype, list(kernels)))
        return {k: seconds[k] for k in kernels}

    return measure


def test_the_measured_winner_is_chosen_cached_and_forgotten_by_refresh(model):
    calls = []
    blocked_wins = {"sdpa": [1.0, 9.0], "blocked": [2.0, 6.0]}  # slower at the short prompt, faster in sum
    choice = A.choose_prefill_attention(model, measure=_fake(blocked_wins, calls))
    assert (choice.kernel, choice.source, choice.prompt_lens) == ("blocked", "measured", list(A.PROMPT_LENS))
    assert choice.to_json()["seconds"] == blocked_wins
    assert calls == [(4, 2, 16, torch.float32, ["sdpa", "blocked"])]  # the model's own head shape and dtype
    again = A.choose_prefill_attention(model, measure=_fake({"sdpa": [0.1, 0.1], "blocked": [9.0, 9.0]}, calls))
    assert (again.kernel, again.source, again.seconds, len(calls)) == ("blocked", "cached", blocked_wins, 1)
    sdpa_wins = {"sdpa": [0.5, 1.0], "blocked": [1.0, 2.0]}
    refreshed = A.choose_prefill_attention(model, refresh=True, measure=_fake(sdpa_wins, calls))
    assert (refreshed.kernel, refreshed.source) == ("sdpa", "measured")
    forget()  # what ``llmrun peaks --refresh`` calls
    assert not A.cache_path().exists()
    A.choose_prefill_attention(model, measure=_fake(blocked_wins, calls))
    assert len(calls) == 3  # measured again


def test_tune_decode_sets_the_choice_on_the_model_and_prefill_takes_it(model, monkeypatch):
    monkeypatch.setattr(A, "measure_kernels", _fake({"sdpa": [2.0, 2.0], "blocked": [1.0, 1.0]}, []))
    assert model.prefill_attention == "sdpa"  # without a measurement: the library's kernel
    tune_decode(model)
    assert model.prefill_attention == "blocked"
    assert {block.self_attn.prefill_kernel for block in model.model.layers} == {"blocked"}  # what attend() gets


def test_the_environment_variable_forces_the_kernel(model, monkeypatch):
    for forced in ("sdpa", "blocked"):
        monkeypatch.setenv("LLMRUN_PREFILL_ATTENTION", forced)
        choice = A.tune_prefill_attention(model)  # measuring would fail: none is measured with the real kernels
        assert (choice.kernel, choice.source, model.prefill_attention) == (forced, "LLMRUN_PREFILL_ATTENTION", forced)
    assert not A.cache_path().exists()


def test_a_bad_environment_value_fails_before_loading(home, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLMRUN_PREFILL_ATTENTION", "flash")
    code = run(gen(tmp_path / "no-such-model"))  # said before the missing model is
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    check_one_line(captured.err, r"LLMRUN_PREFILL_ATTENTION='flash' is not a kernel: set it to auto, sdpa or blocked")


def test_a_far_slower_kernel_is_dropped_after_one_timed_call(model, monkeypatch):
    timed = []
    fake_seconds = {"sdpa": 1.0, "blocked": A.DROPPED * 1.5}

    def seconds_of(run):
        timed.append(run.keywords["kernel"])
        return fake_seconds[run.keywords["kernel"]]

    monkeypatch.setattr(A, "seconds_of", seconds_of)
    seconds = A.measure_kernels(model.model.layers[0].self_attn, torch.float32, ["sdpa", "blocked"])
    assert seconds == {"sdpa": [1.0] * len(A.PROMPT_LENS), "blocked": [fake_seconds["blocked"]]}
    assert timed.count("blocked") == 1 and timed.count("sdpa") == A.REPEATS * len(A.PROMPT_LENS)
    dropped = A.choose_prefill_attention(model, measure=lambda *_: {"sdpa": [5.0, 5.0], "blocked": [1.0]})
    assert dropped.kernel == "sdpa"  # a kernel dropped before the long prompt never wins


def test_the_real_measurement_times_both_kernels_at_each_length(model):
    seconds = A.measure_kernels(model.model.layers[0].self_attn, torch.bfloat16, ["sdpa", "blocked"])
    assert set(seconds) == {"sdpa", "blocked"}
    assert len(seconds["sdpa"]) + len(seconds["blocked"]) > len(A.PROMPT_LENS)  # one may be dropped, not both
    assert all(0 < len(s) <= len(A.PROMPT_LENS) and min(s) > 0 for s in seconds.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 5])
def test_both_kernels_give_the_same_prefill(tiny_factory, home, monkeypatch, dtype, window):
    """Logits of a 24-token prompt, then 6 more tokens continuing it (a cache that starts past 0), in
    blocks of 8 query rows.

    In fp32 the two kernels differ only in the order of float32 sums (relative 1e-6 of a logit).
    In bf16 the blocked kernel rounds the probabilities to bf16 where SDPA's keeps them in float32,
    and the logits themselves are bf16: each kernel's logits lie within bf16's error of the fp32
    model's (that of SDPA's is the measure), so the two lie at most twice that apart. A wrong mask,
    window or head grouping moves these logits by tenths (dropping the window of 5: 0.39), far more.
    """
    overrides = {"num_key_value_heads": 2}
    if window is not None:
        overrides |= {"sliding_window": window}
    path = tiny_factory("mistral" if window else "llama", **overrides)
    monkeypatch.setattr(llmrun.model.attention, "ATTENTION_BLOCK", 8)
    tokens = torch.randint(0, 320, (1, 30), generator=torch.Generator().manual_seed(5))

    def logits(model, kernel):
        model.prefill_attention = kernel
        cache = make_cache(model, 1, 30)
        return torch.cat([forward(model, tokens[:, :24], cache), forward(model, tokens[:, 24:], cache)], dim=1)

    model = load_model(path, torch.device("cpu"), dtype, progress=False)
    sdpa, blocked = logits(model, "sdpa"), logits(model, "blocked")
    if dtype == torch.float32:
        torch.testing.assert_close(blocked, sdpa, rtol=1e-5, atol=1e-5)
    else:
        exact = logits(load_model(path, torch.device("cpu"), torch.float32, progress=False), "sdpa")
        assert (blocked - sdpa).abs().max() <= 2 * (sdpa - exact).abs().max()


def test_bench_measures_the_choice_for_each_thread_count_on_either_path(tiny_factory, home, capsys):
    tiny = tiny_factory("llama", num_key_value_heads=2)
    roofs = ["--peak-flops", "1e11", "--peak-bandwidth", "2e10", "--device", "cpu"]
    for path in ([], ["--eager"]):
        forget()
        assert run(["bench", "--model", str(tiny), "-p", "8", "-n", "0", "-r", "1", "-t", "1,2", *roofs, *path]) == 0
        measured = json.loads(A.cache_path().read_text())
        assert {key.split("|")[1] for key in measured if key != "version"} == {"1 threads", "2 threads"}, path
    capsys.readouterr()
