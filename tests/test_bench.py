"""``llmrun bench``: the JSON fields documented in the README ("Speed"), the Markdown table, CSV/JSONL, bad input."""

from __future__ import annotations

import csv
import io
import json
import statistics

import pytest
import torch

from llmrun.cli.app import run
from llmrun.cli.bench import parse_pairs
from llmrun.errors import LlmrunError
from llmrun.loading.loader import load_model, read_model_args
from llmrun.model.fastpath.gemv import PRODUCTS
from llmrun.profiler.bench.plan import BenchTest, plan_tests
from llmrun.profiler.bench.render import render
from llmrun.profiler.bench.run import BenchReport, phase_costs, speed_of_light
from llmrun.profiler.costs import Widths, decode_weight_bytes
from llmrun.profiler.kernel_floor import fastest_gemv, gemv_floor, gemv_kernels
from llmrun.profiler.roofs import Roofs

# Fixed roofs, so nothing is measured in the tests. Their ridge (1 FLOP/byte) lies between the tiny
# model's fp32 prefill of 8 or 16 tokens (2.4 and 3.8 FLOP/byte: compute binds) and its decode (0.5).
ROOFS = ["--peak-flops", "1e11", "--peak-bandwidth", "1e11"]
ENV_FIELDS = {
    "llmrun_version",
    "git_commit",
    "torch_version",
    "python_version",
    "device",
    "device_name",
    "dtype",
    "threads",
    "model",
    "n_params",
    "weight_bytes",
    "model_bytes",
    "timestamp",
    "fast_path",
}
ROW_FIELDS = {
    "test",
    "n_prompt",
    "n_gen",
    "batch",
    "n_ctx",
    "repetitions",
    "tok_s",
    "tok_s_std",
    "samples_s",
    "flops",
    "bytes",
    "sol_s",
    "sol_tok_s",
    "fraction",
    "fraction_kind",
    "prepare_s",
    "threads",
    "kernel_floor_s",
    "kernel_floor_tok_s",
    "kernel_floor_fraction",
}


@pytest.fixture
def tiny_dir(tiny_factory):
    return tiny_factory("llama", num_key_value_heads=2)


def _bench(capsys, tiny_dir, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what saving the checkpoint printed
    code = run(["bench", "--model", str(tiny_dir), "--random-weights", "--device", "cpu", *ROOFS, *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_has_the_documented_fields(capsys, tiny_dir):
    code, out, _ = _bench(
        capsys, tiny_dir, "-p", "16", "-n", "8", "-pg", "16,8", "-r", "2", "--batch", "1,2", "-o", "json"
    )
    assert code == 0
    report = json.loads(out)
    assert set(report) == {"env", "roofs", "rows"}
    assert set(report["env"]) >= ENV_FIELDS
    assert report["env"]["threads"] == torch.get_num_threads() and report["env"]["dtype"] == "fp32"
    assert report["env"]["fast_path"] is True
    assert report["roofs"] == {"peak_flops": 1e11, "peak_bytes_per_s": 1e11, "source": "override"}
    assert report["env"]["weight_bytes"] == decode_weight_bytes(read_model_args(tiny_dir / "config.json"), 4)
    rows = report["rows"]
    assert [(r["test"], r["batch"]) for r in rows] == [
        ("pp16", 1),
        ("tg8", 1),
        ("pp16+tg8", 1),
        ("pp16", 2),
        ("tg8", 2),
        ("pp16+tg8", 2),
    ]
    for row in rows:
        assert set(row) == ROW_FIELDS
        assert len(row["samples_s"]) == row["repetitions"] == 2
        tokens = row["batch"] * (row["n_prompt"] + row["n_gen"])
        assert row["tok_s"] == pytest.approx(statistics.fmean(tokens / t for t in row["samples_s"]))
        assert row["sol_tok_s"] == pytest.approx(tokens / row["sol_s"])
        assert row["fraction"] == pytest.approx(row["sol_s"] / statistics.fmean(row["samples_s"]))
        assert row["flops"] > 0 and row["bytes"] > 0
    assert [r["fraction_kind"] for r in rows[:3]] == ["mfu", "mbu", "sol"]
    assert [r["n_ctx"] for r in rows[:3]] == [16, 8, 24]  # each test's cache holds what it fills


def test_ctx_size_sets_every_cache_and_is_checked(capsys, tiny_dir):
    code, out, _ = _bench(capsys, tiny_dir, "-p", "16", "-n", "8", "-r", "1", "-c", "100", "-o", "json")
    assert code == 0
    assert [r["n_ctx"] for r in json.loads(out)["rows"]] == [100, 100]
    code, _, err = _bench(capsys, tiny_dir, "-p", "0", "-n", "8", "-r", "1", "-c", "129")
    assert code == 2 and "needs 129 positions but the model's context is 128" in err


def test_markdown_is_a_table_to_paste(capsys, tiny_dir):
    code, out, err = _bench(capsys, tiny_dir, "-p", "8", "-n", "4", "-r", "1", "--warmup", "0")
    assert code == 0
    lines = out.strip().splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 2 + 2  # header, alignment, pp8, tg4
    assert "t/s" in table[0] and "speed of light t/s" in table[0] and "fraction" in table[0]
    assert set(table[1].replace("|", "").split()) <= {"---", "---:"}
    assert table[2].count("|") == table[0].count("|")
    assert "pp8" in table[2] and "MFU" in table[2] and "tg4" in table[3] and "MBU" in table[3]
    assert "±" in table[2]
    assert "torch" in lines[-1] and "roofs" in lines[-1]
    assert "tok/s" in err  # progress rows go to stderr


def test_csv_and_jsonl(capsys, tiny_dir):
    code, out, _ = _bench(capsys, tiny_dir, "-p", "8", "-n", "4", "-r", "1", "-o", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["test"] for r in rows] == ["pp8", "tg4"]
    assert float(rows[1]["tok_s"]) > 0 and rows[0]["dtype"] == "fp32"
    code, out, _ = _bench(capsys, tiny_dir, "-p", "8", "-n", "4", "-r", "1", "-o", "jsonl", "--eager")
    assert code == 0
    lines = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["test"] for r in lines] == ["pp8", "tg4"]
    assert all(r["fast_path"] is False for r in lines)
    assert {"torch_version", "threads", "peak_flops", "tok_s"} <= set(lines[0])


def test_kernel_floor_columns(capsys, tiny_dir):
    code, out, _ = _bench(capsys, tiny_dir, "-p", "0", "-n", "4", "-r", "1", "--kernel-floor", "-o", "json")
    assert code == 0
    (row,) = json.loads(out)["rows"]
    assert row["kernel_floor_s"] > 0
    assert row["kernel_floor_fraction"] == pytest.approx(row["tok_s"] / row["kernel_floor_tok_s"])


@pytest.mark.parametrize(
    "args",
    [
        ["-o", "xml"],
        ["-pg", "512"],
        ["-p", "abc"],
        ["-p", "0", "-n", "0"],
        ["-r", "0"],
        ["--batch", "0"],
        ["-p", "200"],  # the tiny model's context is 128
        ["--peak-flops", "-1"],
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, tiny_dir, args):
    code, out, err = _bench(capsys, tiny_dir, *args)
    assert code == 2
    assert err.startswith("llmrun: error:") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-p", str(10**23)], "-p '100000000000000000000000': give integers of at most 2147483647"),
        (["-n", f"8,{2**31}"], "-n '8,2147483648': give integers of at most 2147483647"),
        (["-pg", f"{2**40},8"], "-pg '1099511627776,8': give integers of at most"),
        (["-b", str(10**23)], "--batch '100000000000000000000000': give integers of at most"),
        (["-r", str(10**23)], "--repetitions must be at most 2147483647, got 100000000000000000000000"),
        (["--warmup", str(2**31)], "--warmup must be at most 2147483647"),
        (["--warmup", "-1"], "--warmup must be at least 0, got -1"),
        (["--peak-flops", "nan"], "--peak-flops must be a positive number (finite, above 0), got nan"),
        (["--peak-bandwidth", "inf"], "--peak-bandwidth must be a positive number (finite, above 0), got inf"),
    ],
)
def test_every_number_is_range_checked_before_loading(capsys, tiny_dir, monkeypatch, args, message):
    import llmrun.loading.session

    monkeypatch.setattr(llmrun.loading.session, "open_session", lambda *a, **k: pytest.fail("loaded the model"))
    code, out, err = _bench(capsys, tiny_dir, *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err, err


def test_a_batch_beyond_memory_is_refused_before_anything_runs(tiny_dir, monkeypatch):
    """The plan's memory check is the profiler's (``check_memory``): KV cache and activations of each test."""
    import llmrun.devices
    from llmrun.profiler.bench.plan import check_tests

    model = load_model(tiny_dir, torch.device("cpu"), torch.float32, progress=False)
    monkeypatch.setattr(llmrun.devices, "available_memory", lambda: 64 * 2**20)
    check_tests(model, [BenchTest(16, 8, 1)])
    with pytest.raises(LlmrunError, match=r"not enough memory on the CPU for pp16\+tg8 at batch 100000 \(KV cache"):
        check_tests(model, [BenchTest(16, 8, 1), BenchTest(16, 8, 100_000)])


def test_plan_and_bounds(tiny_dir):
    tests = plan_tests([512], [128], parse_pairs(["512,128"], "-pg"), [1])
    assert [t.name for t in tests] == ["pp512", "tg128", "pp512+tg128"]
    with pytest.raises(LlmrunError):
        parse_pairs(["1,2,3"], "-pg")
    args = read_model_args(tiny_dir / "config.json")
    widths = Widths.uniform(4)
    pp, tg, both = BenchTest(16, 0), BenchTest(0, 8), BenchTest(16, 8)
    (pp_cost,) = phase_costs(args, pp, widths)
    (tg_cost,) = phase_costs(args, tg, widths)
    low, high = Roofs(1e11, 1e11, "test"), Roofs(1e11, 2e10, "test")  # ridge 1 and 5 FLOP/byte
    # One phase: the slower roof is the bound, and the fraction is named after it.
    assert speed_of_light([pp_cost], low) == (pp_cost.flops / 1e11, "mfu")
    assert speed_of_light([pp_cost], high) == (pp_cost.bytes / 2e10, "mbu")  # 3.8 FLOP/byte < 5
    assert speed_of_light([tg_cost], low) == (tg_cost.bytes / 1e11, "mbu")
    # pp+tg: the bounds of its two phases (the decode after the prompt) add up.
    pp_part, tg_part = phase_costs(args, both, widths)
    assert pp_part == pp_cost and tg_part.bytes > tg_cost.bytes  # decode attends to the prompt too
    seconds, kind = speed_of_light([pp_part, tg_part], low)
    assert kind == "sol" and seconds == pytest.approx(pp_cost.flops / 1e11 + tg_part.bytes / 1e11)


def test_kernel_floor_and_fastest_gemv(tiny_dir):
    model = load_model(tiny_dir, torch.device("cpu"), torch.float32, progress=False)
    seconds, kernel = gemv_floor(model, 1, repeats=2)
    kernels = {
        "torch.mm",
        "F.linear",
        "torch.mv",
        "oneDNN linear",
        "oneDNN linear, prepacked",
        "oneDNN 1x1 conv, reordered",
        "llmrun native",
    }
    assert seconds > 0 and kernel in kernels
    assert set(gemv_kernels(model, 1)) <= kernels
    name, by_kernel = fastest_gemv(model, 2, repeats=2)
    assert "mm" in by_kernel and set(by_kernel) <= set(PRODUCTS)
    assert by_kernel[name] == min(by_kernel.values()) > 0


def test_render_rejects_unknown_format():
    with pytest.raises(LlmrunError):
        render(BenchReport({}, Roofs(1e11, 1e11, "test")), "xml")
