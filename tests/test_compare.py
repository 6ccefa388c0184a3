"""``llmrun compare``: per-op and total deltas between two reports, and the regression gate."""

from __future__ import annotations

import copy
import json

import pytest

from llmrun.cli.app import run
from llmrun.profiler import compare as K


def report(scale: float = 1.0, qkv: float = 1.0) -> dict:
    """A minimal two-run report: prefill 10 ms, decode 2 ms, times multiplied by ``scale``."""

    def op(name, layer, layers, t, share):
        return {"layer": layer, "op": name, "layers": layers, "time_s": t, "share": share}

    def run_(phase, total, qkv_t):
        ops = [op("embed", None, 1, 0.1e-3 * scale, 0.01), op("qkv_proj", None, 30, qkv_t * qkv * scale, 0.5)]
        totals = {"time_s": total * scale, "unattributed_s": 0.1e-3 * scale}
        return {"phase": phase, "batch": 1, "prompt_len": 512, "ops": ops, "totals": totals}

    return {"runs": [run_("prefill", 10e-3, 0.1e-3), run_("decode", 2e-3, 0.02e-3)]}


def test_deltas_per_op_and_total():
    result = K.compare(report(), report(scale=1.1))
    assert [r.key for r in result.runs] == [("prefill", 1, 512), ("decode", 1, 512)]
    prefill = result.runs[0]
    assert prefill.total.change == pytest.approx(0.1)
    qkv = next(d for d in prefill.ops if d.name == "qkv_proj")
    assert qkv.a_s == pytest.approx(30 * 0.1e-3)  # all layers
    assert [d.name for d in prefill.ops] == ["embed", "qkv_proj", "unattributed"]


def test_regression_gate_on_totals_and_ops():
    same_total_slower_op = report(qkv=1.5)
    assert K.regressions(K.compare(report(), report(scale=1.04)), 5) == []
    reasons = K.regressions(K.compare(report(), report(scale=1.06)), 5)
    assert reasons[0] == "prefill batch 1 prompt 512 total: +6.0% (> 5%)"
    assert K.regressions(K.compare(report(), same_total_slower_op), 5) == []
    per_op = K.regressions(K.compare(report(), same_total_slower_op), 5, per_op=True)
    assert any("qkv_proj: +50.0%" in r for r in per_op)
    assert K.regressions(K.compare(report(), report(scale=0.5)), 0) == []  # faster is never a regression


def test_unmatched_runs_and_ops_are_listed():
    b = copy.deepcopy(report())
    b["runs"][1]["batch"] = 16
    b["runs"][0]["ops"].append({"layer": 3, "op": "rope", "layers": 1, "time_s": 1e-4, "share": 0.01})
    result = K.compare(report(), b)
    assert result.only_in_a == [("decode", 1, 512)] and result.only_in_b == [("decode", 16, 512)]
    assert result.runs[0].only_in_b == ["3.rope"]


@pytest.fixture
def files(tmp_path):
    def write(name, data):
        path = tmp_path / name
        path.write_text(json.dumps(data))
        return str(path)

    return write


def test_compare_cli(files, capsys):
    a, b = files("a.json", report()), files("b.json", report(scale=1.2))
    assert run(["compare", a, b]) == 0
    out = capsys.readouterr().out
    assert "qkv_proj" in out and "+20.0%" in out
    assert run(["compare", a, b, "--max-regression", "25"]) == 0
    capsys.readouterr()
    assert run(["compare", a, b, "--max-regression", "10", "--totals-only"]) == 3
    err = capsys.readouterr().err.strip()
    assert err == "llmrun: threshold missed: prefill batch 1 prompt 512 total: +20.0% (> 10%) (and 1 more)"


def test_compare_cli_bad_files(files, tmp_path, capsys):
    good = files("a.json", report())
    assert run(["compare", good, str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert "missing.json is missing: write one with llmrun profile --format json" in err and err.count("\n") == 1
    assert run(["compare", good, files("x.json", {"text": "hi"})]) == 2
    assert "is neither a profile report ('runs') nor a bench report" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{")
    assert run(["compare", good, str(tmp_path / "bad.json")]) == 2
    assert "it is not a JSON report" in capsys.readouterr().err
    assert run(["compare", good, files("l.json", {"runs": [1]})]) == 2
    assert "a run lacks phase" in capsys.readouterr().err
    other = report()
    for r in other["runs"]:
        r["batch"] = 8
    assert run(["compare", good, files("o.json", other)]) == 2
    assert "share no run" in capsys.readouterr().err
    assert run(["compare", good, good, "--max-regression", "-1"]) == 2


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-0.5"])
def test_max_regression_must_be_a_finite_percentage(files, capsys, value):
    good = files("a.json", report())
    assert run(["compare", good, good, "--max-regression", value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--max-regression must be a finite percentage of at least 0, got {value}" in err


def setup_report(**setup) -> dict:
    """``report()`` with the setup fields a profile report carries (model, dtype, device, threads)."""
    base = {"model": "SmolLM2-135M", "dtype": "fp32", "device": {"name": "AMD EPYC", "kind": "cpu"}}
    threads = setup.pop("threads", 4)
    return {**report(), **base, **setup, "settings": {"threads": threads}}


def test_reports_of_different_setups_are_refused_unless_allowed(files, capsys):
    a = files("a.json", setup_report())
    other_model = files("b.json", setup_report(model="Llama-3.2-1B"))
    assert run(["compare", a, other_model, "--max-regression", "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "are runs of different setups (model 'SmolLM2-135M' vs 'Llama-3.2-1B')" in err
    assert "pass --allow-mismatch" in err
    several = files("c.json", setup_report(dtype="bf16", device={"name": "NVIDIA H100", "kind": "cuda"}, threads=1))
    assert run(["compare", a, several]) == 2
    err = capsys.readouterr().err
    for part in ("dtype 'fp32' vs 'bf16'", "device 'AMD EPYC' vs 'NVIDIA H100'", "device kind", "threads 4 vs 1"):
        assert part in err, part
    assert run(["compare", a, other_model, "--allow-mismatch"]) == 0
    captured = capsys.readouterr()
    assert "qkv_proj" in captured.out
    assert captured.err == (
        "llmrun: note: comparing different setups (model 'SmolLM2-135M' vs 'Llama-3.2-1B'), as --allow-mismatch asks\n"
    )


def test_a_field_one_report_lacks_is_unknown_not_a_mismatch(files, capsys):
    old = report()  # an older report: no model, dtype, device or settings
    assert K.mismatches(setup_report(), old) == [] and K.mismatches(old, setup_report()) == []
    no_threads = {**setup_report(), "settings": {}}
    assert K.mismatches(setup_report(), no_threads) == []
    assert run(["compare", files("a.json", setup_report()), files("b.json", old), "--max-regression", "5"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda r: r["runs"][0]["totals"].update(time_s=0), "totals.time_s must be a number of seconds above 0"),
        (lambda r: r["runs"][0]["totals"].update(time_s=float("nan")), "totals.time_s must be a number"),
        (lambda r: r["runs"][0]["totals"].pop("time_s"), "totals.time_s must be a number"),
        (lambda r: r["runs"][1]["totals"].update(unattributed_s="x"), "decode batch 1 prompt 512: totals.unattributed"),
        (lambda r: r["runs"][0]["ops"][1].update(time_s=float("inf")), "op 'qkv_proj' has a time_s, layers or share"),
        (lambda r: r["runs"][0]["ops"][0].pop("share"), "every op needs layer, op, layers, share, time_s"),
        (lambda r: r["runs"][0].update(ops={"embed": 1}), "every op needs"),
    ],
)
def test_times_that_would_gate_nothing_are_refused(files, capsys, damage, message):
    """A zero, NaN or missing time makes every delta 0 or NaN, which no gate can fail: refuse the report."""
    bad = copy.deepcopy(report())
    damage(bad)
    assert run(["compare", files("a.json", report()), files("b.json", bad), "--max-regression", "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
