"""``llmrun compare`` on two ``llmrun bench -o json`` reports: rows matched by test, batch and threads."""

from __future__ import annotations

import pytest
import test_compare

from llmrun.cli.app import run
from llmrun.profiler import compare as K

files = test_compare.files  # the fixture that writes a report to a file and returns its path


def bench_report(scale: float = 1.0, model: str = "m", n_params: int = 1000) -> dict:
    """pp8 and tg4 at batch 1 on 1 and 2 threads; every repetition takes ``scale`` x 10 ms."""
    rows = [
        {"test": test, "n_prompt": p, "n_gen": g, "batch": 1, "threads": t, "samples_s": [0.01 * scale] * 2}
        for t in (1, 2)
        for test, p, g in (("pp8", 8, 0), ("tg4", 0, 4))
    ]
    env = {"model": model, "n_params": n_params, "dtype": "fp32", "device": "cpu", "device_name": "cpu", "threads": 2}
    return {"env": env, "roofs": {}, "rows": rows}


def test_rows_are_matched_by_test_batch_and_threads():
    b = bench_report(1.1)
    b["rows"] = b["rows"][1:]
    result = K.compare(bench_report(), b)
    assert result.kind == "bench"
    assert [r.key for r in result.runs] == [("tg4", 1, 1), ("pp8", 1, 2), ("tg4", 1, 2)]
    assert result.only_in_a == [("pp8", 1, 1)] and result.only_in_b == []
    assert result.runs[0].total.change == pytest.approx(0.1) and result.runs[0].tokens == 4
    assert K.regressions(result, 5)[0] == "tg4 batch 1 threads 1 total: +10.0% (> 5%)"


def test_rows_without_threads_take_the_reports(capsys):
    old = bench_report()
    for row in old["rows"][:2]:
        del row["threads"]
    assert [r.key for r in K.compare(old, bench_report()).runs][:2] == [("pp8", 1, 2), ("tg4", 1, 2)]


def test_compare_cli_on_bench_reports(files, capsys):
    a, b = files("a.json", bench_report()), files("b.json", bench_report(1.2))
    assert run(["compare", a, b]) == 0
    out = capsys.readouterr().out
    assert "tg4" in out and "+20.0%" in out and "400.00" in out  # tg4: 4 tokens in 10 ms
    assert run(["compare", a, b, "--max-regression", "10"]) == 3
    assert "threshold missed: pp8 batch 1 threads 1 total: +20.0%" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("other", "message"),
    [
        (bench_report(model="x"), "model 'm' vs 'x'"),
        (bench_report(n_params=2000), "parameters 1000 vs 2000"),
    ],
)
def test_other_model_or_shape_is_refused_unless_allowed(files, capsys, other, message):
    a, b = files("a.json", bench_report()), files("b.json", other)
    assert run(["compare", a, b]) == 2
    err = capsys.readouterr().err
    assert message in err and "--allow-mismatch" in err and err.count("\n") == 1
    assert run(["compare", a, b, "--allow-mismatch"]) == 0


def test_a_bench_and_a_profile_report_are_refused(files, capsys):
    profile = {"runs": [{"phase": "decode", "batch": 1, "prompt_len": 8, "ops": [], "totals": {"time_s": 1.0}}]}
    profile["runs"][0]["totals"]["unattributed_s"] = 0.0
    a, p = files("a.json", bench_report()), files("p.json", profile)
    assert run(["compare", a, p]) == 2
    assert "is a bench report and" in capsys.readouterr().err
    assert run(["compare", a, a, "--per-op"]) == 2
    assert "bench reports have none" in capsys.readouterr().err


@pytest.mark.parametrize("samples", [[], [0], ["1"], None])
def test_bad_bench_rows_are_one_line(files, capsys, samples):
    bad = bench_report()
    bad["rows"][0]["samples_s"] = samples
    assert run(["compare", files("a.json", bench_report()), files("b.json", bad)]) == 2
    err = capsys.readouterr().err
    assert "pp8 batch 1: samples_s must be times in seconds above 0" in err and err.count("\n") == 1
