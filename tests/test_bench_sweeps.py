"""``llmrun bench`` as llama-bench: lists of -t/-b/-p/-n run every combination, size and params columns,
rows kept on Ctrl-C, --kernel-floor refused without a tg test, the tests checked once."""

from __future__ import annotations

import json

import pytest
import torch

import llmrun.profiler.bench.plan
import llmrun.profiler.bench.run
from llmrun.cli.app import run
from llmrun.profiler.bench.plan import plan_tests

ROOFS = ["--peak-flops", "1e11", "--peak-bandwidth", "1e11"]  # fixed roofs: nothing measured


@pytest.fixture
def tiny_dir(tiny_factory):
    return tiny_factory("llama", num_key_value_heads=2)


def _bench(capsys, tiny_dir, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    argv = ["bench", "-m", str(tiny_dir), "--random-weights", "--device", "cpu", *ROOFS, "-r", "1", "--warmup", "0"]
    code = run([*argv, *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_runs_every_combination_in_llama_bench_order():
    tests = plan_tests([8, 16], [4], [(8, 4)], [1, 2], 0, [1, 2])
    expected = [
        (b, t, name) for b in (1, 2) for t in (1, 2) for name in ("pp8", "pp16", "tg4", "pp8+tg4")
    ]  # fmt: skip
    assert [(x.batch, x.threads, x.name) for x in tests] == expected


def test_thread_and_batch_lists_sweep_and_restore_threads(capsys, tiny_dir):
    before = torch.get_num_threads()
    code, out, _ = _bench(capsys, tiny_dir, "-t", "1,2", "-b", "1,2", "-p", "8", "-n", "4", "-o", "json")
    assert code == 0
    rows = json.loads(out)["rows"]
    assert [(r["batch"], r["threads"], r["test"]) for r in rows] == [
        (b, t, name) for b in (1, 2) for t in (1, 2) for name in ("pp8", "tg4")
    ]
    assert torch.get_num_threads() == before


def test_threads_is_checked_before_loading(capsys, tiny_dir, monkeypatch):
    import llmrun.loading.session

    monkeypatch.setattr(llmrun.loading.session, "open_session", lambda *a, **k: pytest.fail("loaded the model"))
    code, out, err = _bench(capsys, tiny_dir, "-t", "1,0")
    assert code == 2 and out == "" and "--threads '1,0': give one or more integers of at least 1" in err


def test_markdown_has_size_and_params_columns(capsys, tiny_dir):
    code, out, _ = _bench(capsys, tiny_dir, "-p", "8", "-n", "0")
    assert code == 0
    head, _, row = [line for line in out.splitlines() if line.startswith("|")]
    cells = dict(zip(head.strip("|").split(" | "), row.strip("|").split(" | "), strict=True))
    assert cells["size"].strip().endswith("MiB") and cells["params"].strip().endswith("M")


def test_ctrl_c_keeps_the_rows_measured(capsys, tiny_dir, monkeypatch):
    real = llmrun.profiler.bench.run.time_test
    calls = []

    def interrupted_on_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(llmrun.profiler.bench.run, "time_test", interrupted_on_the_second)
    code, out, err = _bench(capsys, tiny_dir, "-p", "8", "-n", "4", "-o", "json")
    assert code == 130 and err.strip().endswith("llmrun: interrupted")
    report = json.loads(out)
    assert report["interrupted"] is True and [r["test"] for r in report["rows"]] == ["pp8"]
    calls.clear()
    code, out, _ = _bench(capsys, tiny_dir, "-p", "8", "-n", "4")
    assert code == 130 and "| pp8 |" in out and "tg4" not in out and "interrupted" in out


def test_kernel_floor_without_a_tg_test_is_refused(capsys, tiny_dir, monkeypatch):
    import llmrun.loading.session

    monkeypatch.setattr(llmrun.loading.session, "open_session", lambda *a, **k: pytest.fail("loaded the model"))
    code, out, err = _bench(capsys, tiny_dir, "-p", "8", "-n", "0", "--kernel-floor")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "--kernel-floor" in err and "-n N" in err


def test_the_tests_are_checked_once(capsys, tiny_dir, monkeypatch):
    real = llmrun.profiler.bench.plan.check_tests
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(llmrun.profiler.bench.plan, "check_tests", counted)
    monkeypatch.setattr(llmrun.profiler.bench.run, "check_tests", counted)
    code, _, _ = _bench(capsys, tiny_dir, "-p", "8", "-n", "0")
    assert code == 0 and len(calls) == 1
