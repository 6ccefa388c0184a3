"""A bench report as text: a Markdown table to paste into an issue, CSV, JSON, or JSON lines."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict

from llmrun.errors import LlmrunError
from llmrun.profiler.bench.run import BenchReport

FORMATS = ("md", "csv", "json", "jsonl")
CSV_ENV_FIELDS = ("model", "model_bytes", "n_params", "device_name", "dtype", "git_commit", "torch_version")


def render(report: BenchReport, fmt: str) -> str:
    """The report as ``md``, ``csv`` (env columns, then each row but its samples), ``json`` or ``jsonl``
    (one line per row with the env and roofs merged in)."""
    if fmt == "json":
        return json.dumps(report.to_json(), indent=2)
    if fmt == "jsonl":
        roofs = report.roofs.to_json(detail=False)
        return "\n".join(json.dumps({**report.env, **roofs, **asdict(r)}) for r in report.rows)
    if fmt == "csv":
        buf = io.StringIO()
        fields = [k for k in asdict(report.rows[0]) if k != "samples_s"] if report.rows else []
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow([*CSV_ENV_FIELDS, *fields])
        for row in report.rows:
            values = asdict(row)
            writer.writerow([report.env.get(k) for k in CSV_ENV_FIELDS] + [values[k] for k in fields])
        return buf.getvalue().rstrip("\n")
    if fmt == "md":
        return _markdown(report)
    raise LlmrunError(f"-o {fmt!r} is not a format; use one of {', '.join(FORMATS)}")


def _markdown(report: BenchReport) -> str:
    env, roofs = report.env, report.roofs
    floor = any(r.kernel_floor_tok_s for r in report.rows)
    head = ["model", "size", "params", "dtype", "threads", "test", "batch", "t/s", "speed of light t/s", "fraction"]
    head += ["kernel floor t/s", "of floor"] if floor else []
    align = "|" + "|".join(" --- " if i in (0, 3, 5) else " ---: " for i in range(len(head))) + "|"
    lines = ["| " + " | ".join(head) + " |", align]
    for r in report.rows:
        cells = [
            str(env["model"]),
            _size(env.get("model_bytes")),
            _params(env.get("n_params")),
            str(env["dtype"]),
            str(r.threads or env["threads"]),
            r.test,
            str(r.batch),
            f"{r.tok_s:.2f} ± {r.tok_s_std:.2f}",
            f"{r.sol_tok_s:.2f}",
            f"{r.fraction:.1%} {r.fraction_kind.upper()}",
        ]
        if floor and r.kernel_floor_tok_s:
            cells += [f"{r.kernel_floor_tok_s:.2f}", f"{r.kernel_floor_fraction:.1%}"]
        elif floor:
            cells += ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    commit = env.get("git_commit") or "unknown"
    lines.append("")
    lines.append(
        f"llmrun {env['llmrun_version']} ({str(commit)[:12]}), torch {env['torch_version']}, {env['device_name']}, "
        f"fast path {'on' if env.get('fast_path') else 'off'}{_kernel(env)}; roofs ({roofs.source}): "
        f"{roofs.peak_flops / 1e9:.0f} GFLOP/s, {roofs.peak_bytes_per_s / 1e9:.1f} GB/s"
    )
    if report.interrupted:
        lines.append("interrupted: the rows above are the tests finished before Ctrl-C")
    return "\n".join(lines)


def _size(n_bytes: object) -> str:
    """Bytes as llama-bench's size column shows them: ``256.00 MiB``, ``14.96 GiB``."""
    if not isinstance(n_bytes, int | float):
        return ""
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.2f} MiB"


def _params(count: object) -> str:
    """A parameter count as llama-bench's params column shows it: ``134.52 M``, ``8.03 B``."""
    if not isinstance(count, int | float):
        return ""
    return f"{count / 1e9:.2f} B" if count >= 1e9 else f"{count / 1e6:.2f} M"


def _kernel(env: dict) -> str:
    """ ", CPU GEMV conv (measured), prefill attention blocked (cached)" for the CPU kernel choices the run
    carries, else ""."""
    named = (("cpu_gemv", "CPU GEMV"), ("prefill_attention", "prefill attention"))
    return "".join(f", {name} {env[key]['kernel']} ({env[key]['source']})" for key, name in named if env.get(key))
