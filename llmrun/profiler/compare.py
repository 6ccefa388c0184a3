"""Compare two profile reports, or two bench reports: time deltas, and a regression gate for CI.

Profile runs are matched by (phase, batch, prompt_len) and their ops by (layer, op); bench rows
by (test, batch, threads), each compared by its mean time per repetition. A delta is B relative
to A: +10% means B took 10% longer. A regression is a run whose total time grew by more than the
allowed percentage (with ``per_op``, also an op that is at least ``min_share`` of A's run).
``mismatches`` names what differs between the setups of two reports (model, its parameter count,
dtype, device, threads): times of different setups say nothing about a change.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from llmrun.errors import LlmrunError
from llmrun.jsonfiles import read_json_object

RunKey = tuple[str, int, int]  # profile: (phase, batch, prompt_len); bench: (test, batch, threads)
KEY_NAMES = {"profile": ("batch", "prompt"), "bench": ("batch", "threads")}


@dataclass
class Delta:
    """Seconds in A and B of one op (or a run's total) and the relative change."""

    name: str
    a_s: float
    b_s: float
    share_a: float = 1.0

    @property
    def change(self) -> float:
        """(B - A) / A; 0 when A is 0."""
        return (self.b_s - self.a_s) / self.a_s if self.a_s else 0.0


@dataclass
class RunDelta:
    """One matched run: its total and its ops."""

    key: RunKey
    total: Delta
    ops: list[Delta]
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    tokens: int = 0  # tokens one repetition processes (bench rows), for tok/s


@dataclass
class Comparison:
    """Matched runs, and the runs found in one report only."""

    runs: list[RunDelta]
    only_in_a: list[RunKey]
    only_in_b: list[RunKey]
    kind: str = "profile"  # or "bench"


def kind(report: dict) -> str:
    """``"bench"`` for a ``llmrun bench -o json`` report (``env`` and ``rows``), else ``"profile"``."""
    return "bench" if isinstance(report.get("rows"), list) and isinstance(report.get("env"), dict) else "profile"


def label(key: RunKey, report_kind: str) -> str:
    """``"decode batch 1 prompt 512"`` or ``"tg128 batch 1 threads 4"``."""
    first, second = KEY_NAMES[report_kind]
    return f"{key[0]} {first} {key[1]} {second} {key[2]}"


def load_report(path: Path) -> dict:
    """Read a ``llmrun profile --format json`` or ``llmrun bench -o json`` file, or say clearly why it is neither.

    Every profile run needs its key, ops and totals, every bench row its test, batch and timed
    repetitions, and every time compared must be a finite number of seconds (a run's total above
    0), so that no delta is NaN or measured against nothing.
    """
    write_one = "write one with llmrun profile --format json or llmrun bench -o json"
    report = read_json_object(Path(path), missing=write_one, fix=f"it is not a JSON report; {write_one}")
    if kind(report) == "bench":
        for row in report["rows"]:
            _check_bench_row(row, path)
        return report
    if not isinstance(report.get("runs"), list):
        raise LlmrunError(
            f"{path} is neither a profile report ('runs') nor a bench report ('env', 'rows'); {write_one}"
        )
    for run in report["runs"]:
        if not isinstance(run, dict) or not {"phase", "batch", "prompt_len", "ops", "totals"} <= set(run):
            raise LlmrunError(f"{path}: a run lacks phase, batch, prompt_len, ops or totals")
        _check_times(run, f"{path}: {run['phase']} batch {run['batch']} prompt {run['prompt_len']}")
    return report


def _check_bench_row(row: object, path: Path) -> None:
    """``LlmrunError`` unless ``row`` has a test name, a batch and timed repetitions of more than 0 seconds."""
    if not isinstance(row, dict) or not isinstance(row.get("test"), str) or not isinstance(row.get("batch"), int):
        raise LlmrunError(f"{path}: every bench row needs a test name and a batch")
    samples = row.get("samples_s")
    if not isinstance(samples, list) or not samples or not all(_seconds(t) > 0 for t in samples):
        raise LlmrunError(f"{path}: {row['test']} batch {row['batch']}: samples_s must be times in seconds above 0")


def _check_times(run: dict, label: str) -> None:
    """``LlmrunError`` unless the run's total is a time above 0 and its unattributed and op times finite."""
    totals, ops = run["totals"], run["ops"]
    if not isinstance(totals, dict) or not _seconds(totals.get("time_s")) > 0:
        raise LlmrunError(f"{label}: totals.time_s must be a number of seconds above 0")
    if math.isnan(_seconds(totals.get("unattributed_s"))):
        raise LlmrunError(f"{label}: totals.unattributed_s must be a finite number of seconds")
    for row in ops if isinstance(ops, list) else [None]:
        fields = ("layer", "op", "layers", "share", "time_s")
        if not isinstance(row, dict) or not set(fields) <= set(row):
            raise LlmrunError(f"{label}: every op needs {', '.join(fields)}")
        if not all(_seconds(row[k]) >= 0 for k in ("layers", "share", "time_s")):
            raise LlmrunError(f"{label}: op {row['op']!r} has a time_s, layers or share that is not a number >= 0")


def _seconds(value: object) -> float:
    """``value`` as a float if it is a finite JSON number, else NaN (false in every comparison)."""
    finite = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if finite else math.nan


def setup(report: dict) -> dict[str, object]:
    """What must agree for two reports' times to say anything about a change: model, dtype, device
    (name and kind) and threads (bench rows carry their own), and for bench reports the parameter
    count; None where the report does not say (older reports)."""
    if kind(report) == "bench":
        env = report["env"]
        return {
            "model": env.get("model"),
            "parameters": env.get("n_params"),
            "dtype": env.get("dtype"),
            "device": env.get("device_name"),
            "device kind": env.get("device"),
        }
    device = report.get("device") if isinstance(report.get("device"), dict) else {}
    settings = report.get("settings") if isinstance(report.get("settings"), dict) else {}
    return {
        "model": report.get("model"),
        "dtype": report.get("dtype"),
        "device": device.get("name"),
        "device kind": device.get("kind"),
        "threads": settings.get("threads"),
    }


def mismatches(a: dict, b: dict) -> list[str]:
    """``"model 'x' vs 'y'"`` for each ``setup`` field that both reports give and that differs."""
    setup_a, setup_b = setup(a), setup(b)
    return [
        f"{name} {setup_a[name]!r} vs {setup_b[name]!r}"
        for name in setup_a
        if setup_a[name] is not None and setup_b[name] is not None and setup_a[name] != setup_b[name]
    ]


def _run_key(run: dict) -> RunKey:
    return run["phase"], run["batch"], run["prompt_len"]


def _op_name(row: dict) -> str:
    return row["op"] if row["layer"] is None else f"{row['layer']}.{row['op']}"


def compare(a: dict, b: dict) -> Comparison:
    """Deltas of every run present in both reports (two profile reports, or two bench reports)."""
    if kind(a) != kind(b):
        raise LlmrunError(f"A is a {kind(a)} report and B a {kind(b)} report; compare two of one kind")
    if kind(a) == "bench":
        return _compare_bench(a, b)
    runs_a = {_run_key(r): r for r in a["runs"]}
    runs_b = {_run_key(r): r for r in b["runs"]}
    matched = []
    for key, run_a in runs_a.items():
        run_b = runs_b.get(key)
        if run_b is None:
            continue
        ops_a = {_op_name(r): r for r in run_a["ops"]}
        ops_b = {_op_name(r): r for r in run_b["ops"]}
        total_a = run_a["totals"]["time_s"]
        ops = [
            Delta(name, row["time_s"] * row["layers"], ops_b[name]["time_s"] * ops_b[name]["layers"], row["share"])
            for name, row in ops_a.items()
            if name in ops_b
        ]
        ops.append(Delta("unattributed", run_a["totals"]["unattributed_s"], run_b["totals"]["unattributed_s"]))
        matched.append(
            RunDelta(
                key,
                Delta("total", total_a, run_b["totals"]["time_s"]),
                ops,
                [n for n in ops_a if n not in ops_b],
                [n for n in ops_b if n not in ops_a],
            )
        )
    return Comparison(matched, [k for k in runs_a if k not in runs_b], [k for k in runs_b if k not in runs_a])


def _compare_bench(a: dict, b: dict) -> Comparison:
    """Bench rows matched by (test, batch, threads), each compared by its mean seconds per repetition."""

    def rows(report: dict) -> dict[RunKey, dict]:
        threads = report["env"].get("threads")
        return {(r["test"], r["batch"], r.get("threads") or threads): r for r in report["rows"]}

    rows_a, rows_b = rows(a), rows(b)
    matched = [
        RunDelta(
            key,
            Delta("total", statistics.fmean(row["samples_s"]), statistics.fmean(rows_b[key]["samples_s"])),
            [],
            tokens=row["batch"] * (row.get("n_prompt", 0) + row.get("n_gen", 0)),
        )
        for key, row in rows_a.items()
        if key in rows_b
    ]
    only_a, only_b = [k for k in rows_a if k not in rows_b], [k for k in rows_b if k not in rows_a]
    return Comparison(matched, only_a, only_b, kind="bench")


def regressions(comparison: Comparison, max_pct: float, *, per_op: bool = False, min_share: float = 0.01) -> list[str]:
    """Reasons, one per run total (or op, with ``per_op``) slower in B by more than ``max_pct`` percent."""
    reasons = []
    for run in comparison.runs:
        name = label(run.key, comparison.kind)
        checked = [run.total]
        if per_op:
            checked += [d for d in run.ops if d.name != "unattributed" and d.share_a >= min_share]
        for delta in checked:
            if delta.change * 100 > max_pct:
                reasons.append(f"{name} {delta.name}: {delta.change:+.1%} (> {max_pct:g}%)")
    return reasons


def render(comparison: Comparison, console, *, show_ops: bool = True) -> None:
    """Rich tables: per profile run, each op's A and B time (total over its layers) and the change;
    for bench reports one table, a line per row with its time and tok/s in A and B."""
    from rich.table import Table

    if comparison.kind == "bench":
        console.print(_bench_table(comparison, Table))
    for run in comparison.runs if comparison.kind == "profile" else ():
        phase, batch, prompt_len = run.key
        table = Table(title=f"{phase} · batch {batch} · prompt {prompt_len}", title_justify="left")
        for name in ("op", "A ms", "B ms", "change"):
            table.add_column(name, justify="left" if name == "op" else "right")
        rows = run.ops if show_ops else []
        for delta in [*rows, run.total]:
            style = "bold" if delta is run.total else None
            table.add_row(
                delta.name, f"{delta.a_s * 1e3:.3f}", f"{delta.b_s * 1e3:.3f}", f"{delta.change:+.1%}", style=style
            )
        console.print(table)
        for side, names in (("A", run.only_in_a), ("B", run.only_in_b)):
            if names:
                console.print(f"only in {side}: {', '.join(names)}", highlight=False)
    for side, keys in (("A", comparison.only_in_a), ("B", comparison.only_in_b)):
        for key in keys:
            console.print(f"run only in {side}: {label(key, comparison.kind)}", highlight=False)


def _bench_table(comparison: Comparison, table_type):
    """One row per matched bench test: A and B milliseconds per repetition and tok/s, and the change in time."""
    table = table_type(title="bench", title_justify="left")
    for name in ("test", "batch", "threads", "A ms", "B ms", "A t/s", "B t/s", "change"):
        table.add_column(name, justify="left" if name == "test" else "right")
    for run in comparison.runs:
        total = run.total
        table.add_row(
            run.key[0], str(run.key[1]), str(run.key[2]), f"{total.a_s * 1e3:.3f}", f"{total.b_s * 1e3:.3f}",
            f"{run.tokens / total.a_s:.2f}", f"{run.tokens / total.b_s:.2f}", f"{total.change:+.1%}",
        )  # fmt: skip
    return table
