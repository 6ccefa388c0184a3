"""The profiler end to end: timers see every op, leave the logits alone, add up to the wall time,
and ``llmrun profile`` writes reports that validate, agree across formats, and gate CI."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch

from llmrun.cli.app import run
from llmrun.errors import LlmrunError
from llmrun.loading.loader import read_model_args
from llmrun.loading.presets import random_model
from llmrun.model.config import ModelArgs
from llmrun.model.executor import decode_step, make_cache, prefill
from llmrun.model.probe import FAST_LAYER_OPS, LAYER_OPS, NULL_PROBE, Probe
from llmrun.model.transformer import Transformer
from llmrun.profiler import costs as C
from llmrun.profiler import report as R
from llmrun.profiler import roofline
from llmrun.profiler.measure import PhaseTiming, measure_config
from llmrun.profiler.profile import ProfileSettings, run_profile
from llmrun.profiler.roofs import Roofs
from llmrun.profiler.schema import SCHEMA, schema_text
from llmrun.profiler.timers import OpTimer, StepTiming

ROOT = Path(__file__).resolve().parents[1]
TEST_ROOFS = Roofs(1e11, 2e10, "override", [])
OVERRIDE = ["--peak-flops", "1e11", "--peak-bandwidth", "2e10"]


def tiny_model(layers: int = 2) -> Transformer:
    args = ModelArgs(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return random_model(args, torch.device("cpu"), torch.float32)  # N(0, 0.02²), never zeros


def _expected_ops(layer_ops: tuple[str, ...], layers: int) -> list[tuple[str, int | None]]:
    expected = [("embed", None), *((op, i) for i in range(layers) for op in layer_ops)]
    return [*expected, ("final_norm", None), ("lm_head", None), ("sample", None)]


@pytest.mark.parametrize("path", ["eager", "fast"])
def test_timer_sees_every_named_op_of_every_layer(path):
    """Prefill always runs eager; decode on the fast path names its fused op groups, never drops one."""
    model = tiny_model(layers=3)
    runs = measure_config(model, 2, 5, 3, repeats=2, warmup=1, path=path)
    prefill_run, decode_run = runs
    assert (prefill_run.phase, len(prefill_run.steps), prefill_run.path) == ("prefill", 2, "eager")
    assert (decode_run.phase, len(decode_run.steps), decode_run.path) == ("decode", 6, path)  # 3 steps x 2 repeats
    assert len(decode_run.unprobed_s) == 6 and all(t > 0 for t in decode_run.unprobed_s)
    decode_ops = FAST_LAYER_OPS if path == "fast" else LAYER_OPS
    for steps, layer_ops in ((prefill_run.steps, LAYER_OPS), (decode_run.steps, decode_ops)):
        for step in steps:
            assert list(step.ops) == _expected_ops(layer_ops, 3)  # execution order
            assert all(t >= 0 for t in step.ops.values())
            assert 0 <= step.attributed_s <= step.wall_s


def test_profiling_does_not_change_the_logits():
    model = tiny_model()
    tokens = torch.randint(0, 320, (2, 7))
    plain, timed = make_cache(model, 2, 9), make_cache(model, 2, 9)
    timer = OpTimer(torch.device("cpu"))
    with timer.step():
        a = prefill(model, tokens, timed, timer)
    torch.testing.assert_close(a, prefill(model, tokens, plain, NULL_PROBE), rtol=0, atol=0)
    with timer.step():
        a = decode_step(model, tokens[:, 0], timed, timer)
    torch.testing.assert_close(a, decode_step(model, tokens[:, 0], plain, Probe()), rtol=0, atol=0)
    assert len(timer.steps) == 2


def test_rows_average_layers_or_list_each_layer():
    model = tiny_model(layers=3)
    args = model.args
    (timing,) = measure_config(model, 1, 6, 0, repeats=3)
    widths = C.Widths.uniform(4)
    mean = roofline.build_run(args, timing, widths, TEST_ROOFS, per_layer=False)
    each = roofline.build_run(args, timing, widths, TEST_ROOFS, per_layer=True)
    assert [r.op for r in mean.ops] == ["embed", *LAYER_OPS, "final_norm", "lm_head", "sample"]
    assert len(each.ops) == 3 * len(LAYER_OPS) + 4
    qkv = next(r for r in mean.ops if r.op == "qkv_proj")
    assert (qkv.layer, qkv.layers) == (None, 3)
    assert qkv.flops == C.prefill_costs(args, 1, 6, widths)[("qkv_proj", 0)].flops
    assert mean.totals.flops == pytest.approx(sum(r.flops * r.layers for r in mean.ops))
    assert mean.totals.flops == pytest.approx(sum(r.flops for r in each.ops))
    for row in mean.ops:
        light = max(row.flops / TEST_ROOFS.peak_flops, row.bytes / TEST_ROOFS.peak_bytes_per_s)
        assert row.roofline_fraction == pytest.approx(light / row.time_s)
        assert row.bound == ("compute" if row.intensity >= TEST_ROOFS.ridge else "memory")


@pytest.mark.slow
def test_op_times_add_up_to_the_wall_time_on_smollm2(smollm2_fp32):
    """Per phase, the ops cover the measured wall time to within 5% (+0.2 ms): median over many steps."""
    torch.set_num_threads(2)
    runs = measure_config(smollm2_fp32, 1, 32, 8, repeats=3, warmup=1)
    for timing in runs:
        run_ = roofline.build_run(smollm2_fp32.args, timing, C.Widths.uniform(4), TEST_ROOFS, per_layer=False)
        t = run_.totals
        slack = 0.05 * t.time_s + 2e-4
        assert 0 <= t.unattributed_s <= slack, (timing.phase, t)
        assert abs(t.time_s - t.attributed_s) <= slack, (timing.phase, t)


def _bounds(args: ModelArgs, phase: str, prompt_len: int, roofs: Roofs) -> dict[str, str]:
    """Bound label of each op of a report row set built from fake (uniform) times."""
    widths = C.Widths.uniform(4)
    costs = (
        C.prefill_costs(args, 1, prompt_len, widths)
        if phase == "prefill"
        else C.decode_costs(args, 1, prompt_len, 8, widths)
    )
    step = StepTiming(1.0, dict.fromkeys(costs, 1e-3))
    timing = PhaseTiming(phase, 1, prompt_len, 0 if phase == "prefill" else 8, [step])
    return {r.op: r.bound for r in roofline.build_run(args, timing, widths, roofs, per_layer=False).ops}


@pytest.mark.slow
def test_smollm2_decode_matmuls_are_memory_bound_and_prefill_512_compute_bound(smollm2_dir):
    """With this machine's measured fp32 roofs (best of a few GEMMs and copies) the labels follow."""
    from llmrun.profiler import peaks

    measured = peaks.measure(torch.device("cpu"), ("fp32",), repeats=3)
    roofs = Roofs(measured.flops["fp32"], measured.bytes_per_s, "measured", [])
    args = read_model_args(smollm2_dir / "config.json")
    layer_matmuls = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    decode = _bounds(args, "decode", 512, roofs)
    prefill_ = _bounds(args, "prefill", 512, roofs)
    assert all(decode[op] == "memory" for op in (*layer_matmuls, "lm_head")), (roofs.ridge, decode)
    assert all(prefill_[op] == "compute" for op in layer_matmuls), (roofs.ridge, prefill_)


def test_run_profile_on_a_loaded_model():
    model = tiny_model()
    settings = ProfileSettings(
        prompt_lens=(4, 6), decode_tokens=2, repeats=1, warmup=0, peak_flops=1e11, peak_bandwidth=2e10
    )
    steps = []
    report = run_profile(model, "tiny", settings, on_step=lambda: steps.append(1))
    assert len(steps) == settings.steps == 2 * 3
    assert (report["model"], report["dtype"], report["device"]["kind"]) == ("tiny", "fp32", "cpu")
    assert report["roofs"]["source"] == "override"
    assert report["settings"]["prompt_lens"] == [4, 6] and report["settings"]["threads"] == torch.get_num_threads()
    assert [(r["phase"], r["prompt_len"]) for r in report["runs"]] == [
        ("prefill", 4),
        ("prefill", 6),
        ("decode", 4),
        ("decode", 6),
    ]
    too_long = ProfileSettings(prompt_lens=(4, 127), decode_tokens=2, peak_flops=1e11, peak_bandwidth=2e10)
    with pytest.raises(LlmrunError, match="--prompt-len 127 plus --decode-tokens 2 exceeds the model's context"):
        run_profile(model, "tiny", too_long, on_step=lambda: pytest.fail("measured before checking the context"))


@pytest.fixture
def tiny_dir(tiny_factory) -> Path:
    return tiny_factory("llama", num_key_value_heads=2)


def profile_json(tiny_dir: Path, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "p.json"
    argv = ["profile", "--model", str(tiny_dir), "--device", "cpu", "--decode-tokens", "3", "--repeats", "2"]
    assert run([*argv, *OVERRIDE, "--format", "json", "--output", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_an_op_faster_than_the_compute_roof_says_the_roof_is_too_low():
    model = tiny_model()

    def notes(peak_flops: float) -> list[str]:
        settings = ProfileSettings(
            prompt_lens=(6,), decode_tokens=1, repeats=1, warmup=0, peak_flops=peak_flops, peak_bandwidth=2e10
        )
        return [note for run in run_profile(model, "tiny", settings)["runs"] for note in run["notes"]]

    low = [note for note in notes(1e3) if "compute roof" in note]  # every product beats 1 kFLOP/s
    assert low and all("llmrun peaks --refresh" in note and "(override)" in note for note in low)
    assert not [note for note in notes(1e18) if "compute roof" in note]


def test_profile_cli_json_validates_and_sweeps(tiny_dir, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    png = tmp_path / "chart.png"
    report = profile_json(tiny_dir, tmp_path, "--prompt-len", "8,16", "--batch", "1,2", "--plot", str(png))
    jsonschema.validate(report, SCHEMA)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["roofs"]["source"] == "override"
    assert {s["source"] for s in report["roofs"]["sources"]} == {"measured", "spec", "nvml"}
    assert report["device"] == {"name": report["device"]["name"], "kind": "cpu"}
    keys = [(r["phase"], r["batch"], r["prompt_len"]) for r in report["runs"]]
    assert keys == [(p, b, n) for p in ("prefill", "decode") for b in (1, 2) for n in (8, 16)]
    for run_ in report["runs"]:
        t = run_["totals"]
        tokens = run_["batch"] * (run_["prompt_len"] if run_["phase"] == "prefill" else 1)
        assert t["tokens_per_s"] == pytest.approx(tokens / t["time_s"])
        assert t["mfu"] == pytest.approx(t["flops"] / t["time_s"] / 1e11)
        assert t["mbu"] == pytest.approx(t["bytes"] / t["time_s"] / 2e10)
        assert run_["context_len"] == run_["prompt_len"] + (3 if run_["phase"] == "decode" else 0)
        assert t["samples"] == (2 if run_["phase"] == "prefill" else 6)


def test_profile_cli_per_layer_rows(tiny_dir, tmp_path):
    report = profile_json(tiny_dir, tmp_path, "--prompt-len", "4", "--per-layer")
    for run_ in report["runs"]:
        assert [r["layer"] for r in run_["ops"]].count(None) == 4  # embed, final_norm, lm_head, sample
        assert {r["layer"] for r in run_["ops"]} == {None, 0, 1}


def test_csv_and_markdown_carry_the_json_numbers(tiny_dir, tmp_path):
    report = profile_json(tiny_dir, tmp_path, "--prompt-len", "8")
    rows = list(csv.DictReader(io.StringIO(R.to_csv(report))))
    ops = [r for r in rows if r["row"] == "op"]
    totals = [r for r in rows if r["row"] == "total"]
    flat = [(run_, op) for run_ in report["runs"] for op in run_["ops"]]
    assert len(ops) == len(flat) and len(totals) == len(report["runs"])
    for row, (run_, op) in zip(ops, flat, strict=True):
        assert (row["phase"], int(row["batch"]), row["op"]) == (run_["phase"], run_["batch"], op["op"])
        for field in R.OP_FIELDS[3:-1]:
            assert float(row[field]) == op[field], field  # full precision
        assert row["bound"] == op["bound"]
    for row, run_ in zip(totals, report["runs"], strict=True):
        for field in ("time_s", "flops", "bytes", "mfu", "mbu", "tokens_per_s", "unattributed_s"):
            assert float(row[field]) == run_["totals"][field]
    md_rows = markdown_op_rows(R.to_markdown(report))
    header = [name for name, _, _ in R.COLUMNS]
    md_ops = [dict(zip(header, cells, strict=True)) for cells in md_rows if cells[1] != "(unattributed)"]
    unattributed = [dict(zip(header, cells, strict=True)) for cells in md_rows if cells[1] == "(unattributed)"]
    assert len(md_ops) == len(flat) and len(unattributed) == len(report["runs"])
    for cells, (_, op) in zip(md_ops, flat, strict=True):  # ms and %, as the terminal table shows them
        assert cells["op"] == op["op"] and cells["bound"] == op["bound"]
        assert float(cells["time ms"]) == pytest.approx(op["time_s"] * 1e3, abs=5e-4)
        assert cells["share"].endswith("%") and float(cells["share"][:-1]) == pytest.approx(op["share"] * 100, abs=0.05)
        assert float(cells["% roofline"][:-1]) == pytest.approx(op["roofline_fraction"] * 100, abs=0.05)
        assert float(cells["GFLOP"]) == pytest.approx(op["flops"] / 1e9, rel=1e-3)
        assert float(cells["MB"]) == pytest.approx(op["bytes"] / 1e6, rel=1e-3)
        assert "e-" not in cells["time ms"] + cells["share"]
    for cells, run_ in zip(unattributed, report["runs"], strict=True):
        assert float(cells["time ms"]) == pytest.approx(run_["totals"]["unattributed_s"] * 1e3, abs=5e-4)


def markdown_op_rows(md: str) -> list[list[str]]:
    """The cells of every row of the op tables (those whose header starts with 'layer')."""
    rows, in_ops = [], False
    for line in md.splitlines():
        if line.startswith("| layer |"):
            in_ops = True
        elif not line.startswith("|"):
            in_ops = False
        elif in_ops and not line.startswith("|-"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_profile_cli_csv_md_and_table_outputs(tiny_dir, tmp_path, capsys):
    base = ["profile", "--model", str(tiny_dir), "--device", "cpu", "--prompt-len", "4", "--decode-tokens", "2"]
    assert run([*base, *OVERRIDE, "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("row,phase,batch,prompt_len,context_len")
    assert run([*base, *OVERRIDE, "--format", "md", "--output", str(tmp_path / "p.md")]) == 0
    assert "## decode · batch 1 · prompt 4 · context 6" in (tmp_path / "p.md").read_text()
    assert run([*base, *OVERRIDE]) == 0
    out = capsys.readouterr().out
    assert "qkv_proj" in out and "MFU" in out and "unattributed" in out and "roofs used (override)" in out


def test_fail_under_exits_3_with_one_line(tiny_dir, capsys):
    base = ["profile", "--model", str(tiny_dir), "--device", "cpu", "--prompt-len", "4", "--decode-tokens", "2"]
    assert run([*base, *OVERRIDE, "--format", "json", "--fail-under", "mbu=0.7,mfu=0.5"]) == 3
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("llmrun: threshold missed: decode batch 1 prompt 4: mbu ")
    assert "prefill batch 1 prompt 4: mfu" in err
    assert run([*base, *OVERRIDE, "--format", "json", "--fail-under", "decode.mfu=0,prefill.mbu=0"]) == 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--prompt-len", "0"], "--prompt-len '0'"),
        (["--prompt-len", "8,x"], "expected integers"),
        (["--batch", ""], "--batch"),
        (["--fail-under", "speed=2"], "METRIC=FRACTION"),
        (["--fail-under", "mbu=70"], "between 0 and 1"),
        (["--plot", "chart.jpg"], ".png or .svg"),
        (["--prompt-len", "120", "--decode-tokens", "20"], "exceeds the model's context of 128"),
        (["--peak-flops", "-1"], "--peak-flops must be a positive number"),
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--fail-under", "mbu=nan"], "between 0 and 1"),
        (["--fail-under", "mfu=-0.1"], "between 0 and 1"),
        (["--fail-under", "mfu=inf"], "between 0 and 1"),
        (["--fail-under", " , "], "names no gate"),
        (["--decode-tokens", "0", "--fail-under", "mbu=0.5"], "decode.mbu=0.5: there is no decode run to gate"),
        (["--decode-tokens", "0", "--fail-under", "mfu=0.1,decode.mfu=0.1"], "no decode run to gate"),
        (["--batch", "4,30000000000000000000000"], "--batch '4,30000000000000000000000': give integers of at most"),
        (["--prompt-len", str(2**31)], "give integers of at most 2147483647"),
        (["--decode-tokens", str(10**20)], "--decode-tokens must be at most 2147483647"),
        (["--repeats", str(2**31)], "--repeats must be at most 2147483647"),
        (["--warmup", "-1"], "--warmup must be at least 0"),
        (["--seed", str(2**64)], "--seed 18446744073709551616 is out of range"),
        (["--seed", str(-(2**63) - 1)], "is out of range: seeds go from 0 to 18446744073709551615"),
        (["--peak-bandwidth", "inf"], "--peak-bandwidth must be a positive number (finite, above 0), got inf"),
        (["--peak-flops", "nan"], "--peak-flops must be a positive number"),
        (["--threads", str(10**20)], "--threads must be between 1 and 4096"),
    ],
)
def test_profile_cli_bad_input_is_one_line_exit_2(tiny_dir, capsys, flags, message):
    assert run(["profile", "--model", str(tiny_dir), "--device", "cpu", *OVERRIDE, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err


def test_fail_under_on_prefill_only_still_gates(tiny_dir, capsys):
    """Without decode a prefill gate has its run: it passes or fails on it, never by default."""
    base = ["profile", "--model", str(tiny_dir), "--device", "cpu", "--prompt-len", "4", "--decode-tokens", "0"]
    assert run([*base, *OVERRIDE, "--format", "json", "--fail-under", "prefill.mbu=0"]) == 0
    capsys.readouterr()
    assert run([*base, *OVERRIDE, "--format", "json", "--fail-under", "mfu=1"]) == 3
    assert capsys.readouterr().err.startswith("llmrun: threshold missed: prefill batch 1 prompt 4: mfu ")


def test_gates_without_a_run_or_with_a_nan_metric_never_pass():
    prefill_only = {"runs": [{"phase": "prefill", "batch": 1, "prompt_len": 4, "totals": {"mfu": 0.2, "mbu": 0.1}}]}
    assert R.missed_thresholds(prefill_only, R.parse_fail_under("mfu=0.1")) == []
    with pytest.raises(LlmrunError, match="no decode run to gate"):
        R.missed_thresholds(prefill_only, R.parse_fail_under("mfu=0.1,mbu=0.1"))
    with pytest.raises(LlmrunError, match="no prefill run to gate"):
        R.missed_thresholds({"runs": []}, R.parse_fail_under("mfu=0.1"))
    prefill_only["runs"][0]["totals"]["mfu"] = float("nan")
    assert R.missed_thresholds(prefill_only, R.parse_fail_under("mfu=0")) == ["prefill batch 1 prompt 4: mfu nan < 0"]
    R.check_gates(R.parse_fail_under("decode.mfu=0.5"), ProfileSettings(decode_tokens=1).phases)
    with pytest.raises(LlmrunError, match="--decode-tokens 0 measures prefill only"):
        R.check_gates(R.parse_fail_under("decode.mfu=0.5"), ProfileSettings(decode_tokens=0).phases)


def test_run_profile_refuses_a_batch_beyond_memory_before_measuring(monkeypatch):
    """Every (batch, prompt length) is checked against the memory free first: the small batch is not
    measured, nor are the roofs, before the large one is refused."""
    import llmrun.devices

    monkeypatch.setattr(llmrun.devices, "available_memory", lambda: 64 * 2**20)
    settings = ProfileSettings(prompt_lens=(4,), batches=(1, 100_000), decode_tokens=2, repeats=1, warmup=0)
    with pytest.raises(LlmrunError, match=r"not enough memory on the CPU for batch 100000 prompt 4 \(KV cache"):
        run_profile(
            tiny_model(),
            "tiny",
            settings,
            on_step=lambda: pytest.fail("measured before checking the memory"),
            on_measure=lambda name: pytest.fail("roofs measured before checking the memory"),
        )


def test_roofs_source_without_figures_is_refused(tiny_dir, tmp_path, monkeypatch, capsys):
    """On a CPU the spec table and NVML know nothing: asking for them is an error, not measured roofs
    under another name, unless both numbers are given."""
    from llmrun.profiler import peaks
    from llmrun.profiler.roofs import Roof, select_roofs

    monkeypatch.setenv("LLMRUN_HOME", str(tmp_path))
    cpu = torch.device("cpu")
    peaks.save(peaks.MeasuredPeaks(peaks.device_name(cpu), "cpu", {"fp32": 1e11}, 2e10), cpu)
    for source, why in (("spec", "the spec table lists GPUs only"), ("nvml", "not a CUDA device")):
        with pytest.raises(LlmrunError, match=f"--roofs {source}: that source has no figures for .*{why}"):
            select_roofs(cpu, "fp32", prefer=source)
        with pytest.raises(LlmrunError, match="use --roofs measured, or pass --peak-flops and --peak-bandwidth"):
            select_roofs(cpu, "fp32", prefer=source, peak_flops=1e9)  # the bandwidth would still be measured
        assert select_roofs(cpu, "fp32", prefer=source, peak_flops=1.0, peak_bandwidth=2.0).source == "override"
    assert select_roofs(cpu, "fp32").source == "measured"
    # A source with one number gives it, and the other comes from the next source, labelled.
    import llmrun.profiler.roofs as roofs_module

    monkeypatch.setattr(roofs_module, "nvml_roof", lambda device: Roof("nvml", None, 5e10, "stand-in"))
    assert select_roofs(cpu, "fp32", prefer="nvml").source == "flops: measured, bandwidth: nvml"
    argv = ["profile", "--model", str(tiny_dir), "--device", "cpu", "--prompt-len", "8", "--roofs", "spec"]
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--roofs spec: that source has no figures" in err


def test_plain_png_without_matplotlib(tiny_dir, tmp_path, monkeypatch):
    import sys
    import zlib

    report = profile_json(tiny_dir, tmp_path, "--prompt-len", "8")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    from llmrun.profiler.plot import plot_roofline

    data = plot_roofline(report, tmp_path / "plain.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    idat = data.index(b"IDAT")
    raw = zlib.decompress(data[idat + 4 : idat + 4 + int.from_bytes(data[idat - 4 : idat], "big")])
    assert len(raw) == height * (1 + 3 * width)
    assert bytes((31, 119, 180)) in raw and bytes((44, 160, 44)) in raw  # matmul and element-wise markers
    with pytest.raises(LlmrunError, match="needs matplotlib"):
        plot_roofline(report, tmp_path / "plain.svg")


def test_fail_under_parser():
    assert R.parse_fail_under("mbu=0.7, mfu=0.5") == [("decode", "mbu", 0.7), ("prefill", "mfu", 0.5)]
    assert R.parse_fail_under("prefill.mbu=0.1") == [("prefill", "mbu", 0.1)]
    with pytest.raises(LlmrunError, match="not a number"):
        R.parse_fail_under("mfu=high")
    for floor in ("nan", "-0.5", "inf", "1.5"):
        with pytest.raises(LlmrunError, match="give a fraction between 0 and 1"):
            R.parse_fail_under(f"mbu={floor}")
    with pytest.raises(LlmrunError, match="names no gate"):
        R.parse_fail_under(",")


def test_shipped_schema_matches_the_documented_copy():
    assert (ROOT / "docs" / "profile-schema.json").read_text() == schema_text()
