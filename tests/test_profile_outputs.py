"""What ``llmrun profile`` writes beside its report: the Perfetto trace, the charts, a table that fits.

The trace must be valid trace-event JSON whose slices nest (op in layer in step) with monotonic
timestamps per track; chart markers must follow the ops' shares; the table must fit the terminal.
"""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console
from test_profiler import OVERRIDE, tiny_model

from llmrun.cli.app import run
from llmrun.profiler import plot as P
from llmrun.profiler import pngplot
from llmrun.profiler import report as R
from llmrun.profiler.caches import cache_note, parse_size
from llmrun.profiler.measure import measure_config
from llmrun.profiler.trace import trace_events

REQUIRED = ("name", "ph", "ts", "dur", "pid", "tid", "args")


def _slices(events: list[dict]) -> dict[int, list[dict]]:
    tracks: dict[int, list[dict]] = {}
    for event in events:
        if event["ph"] == "X":
            tracks.setdefault(event["tid"], []).append(event)
    return tracks


def _inside(child: dict, parent: dict) -> bool:
    return parent["ts"] <= child["ts"] and child["ts"] + child["dur"] <= parent["ts"] + parent["dur"] + 1e-6


@pytest.mark.parametrize("path", ["fast", "eager"])
def test_trace_is_valid_nested_and_monotonic(path):
    timings = measure_config(tiny_model(layers=2), 2, 5, 3, repeats=2, warmup=0, path=path)
    events = json.loads(json.dumps({"traceEvents": trace_events(timings, model="tiny")}))["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    tracks = _slices(events)
    assert set(tracks) == set(names) == {1, 2}
    for tid, slices in tracks.items():
        assert all(all(key in e for key in REQUIRED) and e["dur"] >= 0 for e in slices)
        assert [e["ts"] for e in slices] == sorted(e["ts"] for e in slices)  # monotonic per track
        steps = [e for e in slices if e["cat"] == "step"]
        assert len(steps) == len(timings[tid - 1].steps)
        for e in slices:
            assert {"phase", "batch", "prompt_len"} <= set(e["args"]) and e["args"]["batch"] == 2
            if e["cat"] == "step":
                continue
            (step,) = [s for s in steps if _inside(e, s)]  # in exactly one step
            if e["cat"] == "op" and e["args"]["layer"] is not None:
                layers = [s for s in slices if s["cat"] == "layer" and _inside(e, s)]
                assert [s["args"]["layer"] for s in layers] == [e["args"]["layer"]]
                assert _inside(layers[0], step)
    decode_ops = {e["name"] for e in tracks[2] if e["cat"] == "op"}
    assert ("o_proj+attn_residual" in decode_ops) == (path == "fast")


def _report(tiny_factory, tmp_path, *extra: str) -> dict:
    model = tiny_factory("llama", num_key_value_heads=2)
    out = tmp_path / "p.json"
    argv = ["profile", "--model", str(model), "--device", "cpu", "--decode-tokens", "2", "--repeats", "1"]
    assert run([*argv, *OVERRIDE, "--format", "json", "--output", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_cli_writes_trace_and_both_charts(tiny_factory, tmp_path):
    pytest.importorskip("matplotlib")
    files = {name: tmp_path / name for name in ("t.json", "roof.svg", "share.png")}
    report = _report(
        tiny_factory, tmp_path, "--prompt-len", "4,8", "--batch", "1,2", "--trace", str(files["t.json"]),
        "--plot", str(files["roof.svg"]), "--plot-share", str(files["share.png"]),
    )  # fmt: skip
    trace = json.loads(files["t.json"].read_text())
    assert len(_slices(trace["traceEvents"])) == len(report["runs"])
    assert files["share.png"].read_bytes()[:4] == b"\x89PNG"
    svg = files["roof.svg"].read_text()
    assert "sweep: batch 1, 2 × prompt 4, 8" in svg and "(2, 8)" in svg  # the sweep in the title, points labelled
    assert [r["path"] for r in report["runs"]] == 4 * ["eager"] + 4 * ["fast"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--plot-share", "s.png"], "comes with --plot"), (["--trace", "t.txt"], "the trace is written as .json")],
)
def test_cli_refuses_outputs_it_cannot_write(tiny_factory, capsys, flags, message):
    model = tiny_factory("llama")
    capsys.readouterr()
    assert run(["profile", "--model", str(model), "--device", "cpu", *OVERRIDE, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_marker_areas_follow_the_shares(tiny_factory, tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    report = _report(tiny_factory, tmp_path, "--prompt-len", "8", "--batch", "1,2")
    fig = P.draw_roofline(report, plt)
    drawn = {c.get_gid(): c.get_sizes()[0] for c in fig.axes[0].collections if c.get_gid()}
    plt.close(fig)
    rows = {
        f"{run_['phase']}|{run_['batch']}|{run_['prompt_len']}|{row['op']}|{row['layer']}": row
        for run_ in report["runs"]
        for row in run_["ops"]
        if row["flops"] > 0
    }
    assert set(drawn) == set(rows)
    for gid, area in drawn.items():
        assert area == pytest.approx(P.MAX_AREA * rows[gid]["share"])
        assert pngplot.marker_radius(rows[gid]) == max(1, round(pngplot.MAX_RADIUS * rows[gid]["share"] ** 0.5))
    assert {P.family(r["op"]) for r in rows.values()} == {"matmul", "attention", "element-wise"}
    assert P.family("o_proj+attn_residual") == "matmul" and P.family("attn_allreduce") == "communication"


def test_share_bars_add_up_to_the_phase(tiny_factory, tmp_path):
    report = _report(tiny_factory, tmp_path, "--prompt-len", "8")
    for run_ in report["runs"]:
        t = run_["totals"]
        total = sum(share for _, share in P.share_segments(run_))
        assert total == pytest.approx((t["attributed_s"] + t["unattributed_s"]) / t["time_s"], rel=0.05)


def test_table_fits_the_terminal_and_wide_shows_every_column(tiny_factory, tmp_path):
    report = _report(tiny_factory, tmp_path, "--prompt-len", "8")
    for width, wide in ((100, False), (80, False), (250, True)):
        console = Console(file=io.StringIO(), width=width)
        R.render_tables(report, console, wide=wide)
        text = console.file.getvalue()
        tables = [line for line in text.splitlines() if line.startswith(("┃", "│"))]
        if not wide:
            assert max(len(line) for line in tables) <= width
            assert "--wide shows them" in text
        headers = R.fitting_columns(report["runs"], width, wide=wide)
        assert {"layer", "op", "time ms", "share"} <= {name for name, _, _ in headers}
    assert R.fitting_columns(report["runs"], 250, wide=True) == R.COLUMNS
    assert "(unattributed)" in text and "x light" in text


def test_cache_notes():
    assert parse_size("32768K") == 32 * 2**20 and parse_size("2M") == 2 * 2**20
    assert "fit in the L3 cache" in cache_note("prefill", 10e6, 20e6, ("L3", 32 * 2**20), gpu=False)
    assert cache_note("prefill", 10e6, 20e6, ("L2", 50 * 2**20), gpu=True) is None
    assert "decode step's working set" in cache_note("decode", 10e6, 20e6, ("L2", 50 * 2**20), gpu=True)
    assert cache_note("decode", 10e9, 20e9, ("L3", 32 * 2**20), gpu=False) is None
