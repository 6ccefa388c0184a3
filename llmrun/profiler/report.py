"""The profile report: one JSON-able dict, rendered as rich tables, JSON, CSV or markdown.

Every format is rendered from the same dict (``build_report``), so they carry the same numbers:
JSON and CSV at full precision in the JSON fields' units (seconds, FLOPs, bytes, per second);
the rich table and markdown in the units people read (ms, %, GFLOP, MB, GFLOP/s, GB/s), the
table with the columns that fit the terminal, markdown with all of them.
Field meanings are in docs/roofline.md and the schema (``llmrun.profiler.schema``).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Collection
from dataclasses import asdict

from llmrun.errors import LlmrunError
from llmrun.profiler import costs as C
from llmrun.profiler.roofline import Run
from llmrun.profiler.roofs import Roofs

SCHEMA_VERSION = 1

CONVENTIONS = {
    "flops": "a multiply-add is 2 FLOPs; linear layers 2*M*N*K (bias adds not counted, as FlopCounterMode)",
    "attention": C.ATTENTION_CONVENTION,
    "bytes": "lower bound on main-memory traffic: each op reads its inputs and weights once and writes its outputs "
    "once; KV cache read over the attended positions (GQA: key/value heads), written for the new tokens",
    "decode_row": "one decode step (one new token per sequence): FLOPs and bytes averaged over the measured steps, "
    "time the median over them",
    "layer_rows": "layer null with layers > 1: the mean over that many layers (share counts them all)",
    "unattributed": "per step, wall time minus the sum of its op times (glue code, RoPE tables, timers); "
    "attributed_s and unattributed_s are medians over the steps",
    "roofline_fraction": "max(flops/peak_flops, bytes/peak_bytes_per_s) / time_s (speed-of-light time over time)",
    "bound": "compute if intensity >= ridge (peak_flops / peak_bytes_per_s), else memory",
    "path": "decode runs on the path named by the run's path: fast = the fast decoder that generate and bench run, "
    "marked after each op group (a fused group is named by its parts joined with '+' and costs their sum); eager = "
    "the layer-by-layer executor, one region per op. Prefill has no separate fast path: it always runs eager",
    "probe_overhead": "time_s / unprobed_time_s - 1, unprobed_time_s being the median wall time of the same decode "
    "steps run again without a probe (the step bench times)",
    "light_s": "speed-of-light seconds of the op, max(flops/peak_flops, bytes/peak_bytes_per_s); time_s / light_s "
    "is how far the op is from it (the table's 'x light')",
}

OP_FIELDS = (
    "layer",
    "op",
    "layers",
    "time_s",
    "time_s_iqr",
    "share",
    "flops",
    "bytes",
    "intensity",
    "achieved_flops_per_s",
    "achieved_bytes_per_s",
    "attainable_flops_per_s",
    "roofline_fraction",
    "light_s",
    "bound",
)
TOTAL_FIELDS = (
    "time_s",
    "time_s_iqr",
    "time_s_min",
    "time_s_max",
    "samples",
    "flops",
    "bytes",
    "mfu",
    "mbu",
    "tokens_per_s",
    "attributed_s",
    "unattributed_s",
    "unprobed_time_s",
    "probe_overhead",
    "communication_s",
    "communication_share",
)
RUN_FIELDS = ("phase", "batch", "prompt_len", "context_len", "mean_context_len", "decode_tokens", "path")


def build_report(
    runs: list[Run],
    *,
    model: str,
    dtype: str,
    device: dict[str, str],
    roofs: Roofs,
    settings: dict[str, object],
) -> dict:
    """The report as plain JSON types (see ``llmrun.profiler.schema.SCHEMA``)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "model": model,
        "dtype": dtype,
        "device": device,
        "roofs": roofs.to_json(),
        "settings": settings,
        "conventions": CONVENTIONS,
        "runs": [_run_json(run) for run in runs],
    }


def _run_json(run: Run) -> dict:
    data = asdict(run)
    return {
        **{k: data[k] for k in RUN_FIELDS},
        "ops": [{k: row[k] for k in OP_FIELDS} for row in data["ops"]],
        "totals": {k: data["totals"][k] for k in TOTAL_FIELDS},
        "notes": data["notes"],
    }


def to_json(report: dict) -> str:
    """Indented JSON text."""
    return json.dumps(report, indent=2) + "\n"


CSV_COLUMNS = ("row", *RUN_FIELDS, *OP_FIELDS, "mfu", "mbu", "tokens_per_s", "unattributed_s")


def to_csv(report: dict) -> str:
    """One line per op per run (``row`` = op) and one per run's totals (``row`` = total), full precision."""
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for run in report["runs"]:
        head = {k: run[k] for k in RUN_FIELDS}
        for row in run["ops"]:
            writer.writerow({"row": "op", **head, **row, "layer": "" if row["layer"] is None else row["layer"]})
        totals = run["totals"]
        writer.writerow({"row": "total", **head, "op": "total", **totals, "share": 1.0})
    return out.getvalue()


def run_title(run: dict) -> str:
    """'decode · batch 1 · prompt 512 · context 544 · fast path'."""
    return (
        f"{run['phase']} · batch {run['batch']} · prompt {run['prompt_len']} · context {run['context_len']} · "
        f"{run.get('path', 'eager')} path"
    )


def summary_line(run: dict) -> str:
    """tokens/s, MFU, MBU, the unattributed time and (decode) the probe's overhead of one run, in words."""
    t = run["totals"]
    unit = "step" if run["phase"] == "decode" else "pass"
    line = (
        f"{t['tokens_per_s']:.1f} tokens/s · {t['time_s'] * 1e3:.2f} ms per {unit} "
        f"(IQR {t['time_s_iqr'] * 1e3:.2f} ms, n={t['samples']}) · MFU {t['mfu']:.1%} · MBU {t['mbu']:.1%} · "
        f"unattributed "
        f"{t['unattributed_s'] * 1e3:.2f} ms ({t['unattributed_s'] / t['time_s']:.1%})"
    )
    if t.get("communication_s") is not None:
        line += f" · all-reduces {t['communication_s'] * 1e3:.2f} ms ({t['communication_share']:.1%} of the step)"
    if t.get("unprobed_time_s"):
        line += (
            f" · without the probe {t['unprobed_time_s'] * 1e3:.2f} ms per step "
            f"({run['batch'] / t['unprobed_time_s']:.1f} tokens/s; probe overhead {t['probe_overhead']:+.1%})"
        )
    return line


def roofs_lines(report: dict) -> list[str]:
    """The roofs used, and every source with its note."""
    roofs = report["roofs"]
    attention = report.get("settings", {}).get("prefill_attention")  # CPU runs carry it
    lines = [
        f"device: {report['device']['name']} ({report['device']['kind']}), dtype {report['dtype']}, "
        f"model {report['model']}"
        + (f", prefill attention {attention['kernel']} ({attention['source']})" if attention else ""),
        f"roofs used ({roofs['source']}): {roofs['peak_flops'] / 1e9:.4g} GFLOP/s, "
        f"{roofs['peak_bytes_per_s'] / 1e9:.4g} GB/s, ridge {roofs['ridge']:.3g} FLOP/byte",
    ]
    for src in roofs["sources"]:
        flops = "—" if src["peak_flops"] is None else f"{src['peak_flops'] / 1e9:.4g} GFLOP/s"
        bw = "—" if src["peak_bytes_per_s"] is None else f"{src['peak_bytes_per_s'] / 1e9:.4g} GB/s"
        lines.append(f"  {src['source']}: {flops}, {bw} ({src['note']})")
    return lines


def _layer(row: dict) -> str:
    if row["layer"] is not None:
        return str(row["layer"])
    return "" if row["layers"] == 1 else f"mean of {row['layers']}"


def _gap(row: dict) -> str:
    """Measured time over speed-of-light time: '2.5x', '840x'."""
    if not row["light_s"]:
        return ""
    gap = row["time_s"] / row["light_s"]
    return f"{gap:.0f}x" if gap >= 100 else f"{gap:.3g}x"


# (header, cell of an op row, priority): priority 0 is always shown; the table adds the others in
# priority order while they fit the terminal (all of them with --wide, and in markdown).
COLUMNS = (
    ("layer", _layer, 0),
    ("op", lambda r: r["op"], 0),
    ("time ms", lambda r: f"{r['time_s'] * 1e3:.3f}", 0),
    ("share", lambda r: f"{r['share']:.1%}", 0),
    ("x light", _gap, 1),
    ("% roofline", lambda r: f"{r['roofline_fraction']:.1%}", 1),
    ("bound", lambda r: r["bound"], 1),
    ("GB/s", lambda r: f"{r['achieved_bytes_per_s'] / 1e9:.4g}", 2),
    ("GFLOP/s", lambda r: f"{r['achieved_flops_per_s'] / 1e9:.4g}", 2),
    ("FLOP/B", lambda r: f"{r['intensity']:.3g}", 3),
    ("IQR ms", lambda r: f"{r['time_s_iqr'] * 1e3:.3f}", 3),
    ("GFLOP", lambda r: f"{r['flops'] / 1e9:.4g}", 4),
    ("MB", lambda r: f"{r['bytes'] / 1e6:.4g}", 4),
    ("attainable GFLOP/s", lambda r: f"{r['attainable_flops_per_s'] / 1e9:.4g}", 5),
)
COLUMN_PAD = 3  # a rich table column's padding and rule, in characters


def table_rows(run: dict, columns: tuple = COLUMNS) -> list[list[str]]:
    """The cells of ``columns`` for every op row of ``run``, then the unattributed time as its own row."""
    rows = [[cell(row) for _, cell, _ in columns] for row in run["ops"]]
    t = run["totals"]
    unattributed = {"time ms": f"{t['unattributed_s'] * 1e3:.3f}", "share": f"{t['unattributed_s'] / t['time_s']:.1%}"}
    rows.append([unattributed.get(name, "(unattributed)" if name == "op" else "") for name, _, _ in columns])
    return rows


def fitting_columns(runs: list[dict], width: int, *, wide: bool = False) -> tuple:
    """The columns of ``COLUMNS`` that fit ``width`` characters for every run, by priority (all with ``wide``)."""
    if wide:
        return COLUMNS
    cells = [row for run in runs for row in table_rows(run)]
    need = [max(len(name), *(len(row[i]) for row in cells)) + COLUMN_PAD for i, (name, _, _) in enumerate(COLUMNS)]
    chosen, used = set(), 1
    for priority in sorted({p for _, _, p in COLUMNS}):
        group = [i for i, (_, _, p) in enumerate(COLUMNS) if p == priority]
        extra = sum(need[i] for i in group)
        if priority and used + extra > width:
            break
        chosen.update(group)
        used += extra
    return tuple(c for i, c in enumerate(COLUMNS) if i in chosen)


def to_markdown(report: dict) -> str:
    """Markdown: roofs and conventions, then per run a summary line, notes and the full table (ms and %)."""
    lines = ["# llmrun profile", ""]
    lines += [f"- {line.strip()}" for line in roofs_lines(report)]
    lines += ["", "Conventions:", ""]
    lines += [f"- {k}: {v}" for k, v in report["conventions"].items()]
    for run in report["runs"]:
        lines += ["", f"## {run_title(run)}", "", summary_line(run), ""]
        lines += [f"Note: {note}" for note in run.get("notes", [])]
        lines += [""] if run.get("notes") else []
        lines.append("| " + " | ".join(name for name, _, _ in COLUMNS) + " |")
        lines.append("|" + "---|" * len(COLUMNS))
        lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(run)]
    return "\n".join(lines) + "\n"


def render_tables(report: dict, console, *, wide: bool = False) -> None:
    """Rich tables, one per run, with the columns that fit ``console.width`` (all with ``wide``) and a summary."""
    from rich.table import Table

    for line in roofs_lines(report):
        console.print(line, highlight=False, markup=False)
    columns = fitting_columns(report["runs"], console.width, wide=wide)
    for run in report["runs"]:
        table = Table(title=run_title(run), title_justify="left", caption_justify="left")
        table.caption = "\n".join([summary_line(run), *(f"note: {note}" for note in run.get("notes", []))])
        for name, _, _ in columns:
            table.add_column(name, justify="left" if name in ("layer", "op", "bound") else "right")
        for cells in table_rows(run, columns):
            table.add_row(*cells)
        console.print(table)
    if len(columns) < len(COLUMNS):
        shown = {name for name, _, _ in columns}
        hidden = ", ".join(name for name, _, _ in COLUMNS if name not in shown)
        console.print(f"(columns left out to fit the terminal: {hidden}; --wide shows them)", highlight=False)


FAIL_METRICS = ("mfu", "mbu")
DEFAULT_GATE_PHASE = {"mfu": "prefill", "mbu": "decode"}
"""A bare metric gates the phase it measures: MFU for compute-bound prefill, MBU for memory-bound decode."""


def parse_fail_under(spec: str) -> list[tuple[str, str, float]]:
    """'mbu=0.7,mfu=0.5' -> [('decode', 'mbu', 0.7), ('prefill', 'mfu', 0.5)]; ``LlmrunError`` with the reason.

    ``PHASE.METRIC=X`` (``decode.mfu=0.01``) names the phase; a bare metric uses ``DEFAULT_GATE_PHASE``.
    Each floor is a fraction from 0 to 1 (NaN, inf and negatives are refused), and a spec must hold a gate.
    """
    gates = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = part.partition("=")
        phase, dot, metric = key.strip().lower().rpartition(".")
        if not sep or metric not in FAIL_METRICS or (dot and phase not in ("prefill", "decode")):
            raise LlmrunError(
                f"--fail-under {part!r}: expected [prefill.|decode.]METRIC=FRACTION with METRIC mfu or mbu"
            )
        try:
            floor = float(value)
        except ValueError:
            raise LlmrunError(f"--fail-under {part!r}: {value!r} is not a number") from None
        if not 0 <= floor <= 1:
            raise LlmrunError(f"--fail-under {part!r}: give a fraction between 0 and 1 (0.7 for 70%)")
        gates.append((phase or DEFAULT_GATE_PHASE[metric], metric, floor))
    if not gates:
        raise LlmrunError(f"--fail-under {spec!r} names no gate; give e.g. mbu=0.7,mfu=0.5")
    return gates


def check_gates(gates: list[tuple[str, str, float]], phases: Collection[str]) -> None:
    """``LlmrunError`` for a gate whose phase is not among ``phases`` (those measured): it would gate nothing."""
    for phase, metric, floor in gates:
        if phase not in phases:
            hint = " (--decode-tokens 0 measures prefill only)" if phase == "decode" else ""
            raise LlmrunError(f"--fail-under {phase}.{metric}={floor:g}: there is no {phase} run to gate{hint}")


def missed_thresholds(report: dict, gates: list[tuple[str, str, float]]) -> list[str]:
    """One reason per (run, gate) whose metric is below its floor (or NaN), for the runs of the gate's phase.

    A gate whose phase has no run in ``report`` is an ``LlmrunError`` (``check_gates``), never a pass.
    """
    check_gates(gates, {run["phase"] for run in report["runs"]})
    reasons = []
    for phase, metric, floor in gates:
        for run in report["runs"]:
            value = run["totals"][metric]
            if run["phase"] == phase and not value >= floor:
                reasons.append(
                    f"{phase} batch {run['batch']} prompt {run['prompt_len']}: {metric} {value:.3f} < {floor:g}"
                )
    return reasons
