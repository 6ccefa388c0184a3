"""``llmrun compare``: time deltas between two ``llmrun profile --format json`` reports (per op and
in total), or between two ``llmrun bench -o json`` reports (per test, batch and thread count).

Examples:

    llmrun compare before.json after.json
    llmrun compare bench-main.json bench-pr.json --max-regression 5      # bench reports too
    llmrun compare main.json pr.json --max-regression 5          # exit 3 if a run got >5% slower
    llmrun compare main.json pr.json --max-regression 10 --per-op
    llmrun compare cpu.json gpu.json --allow-mismatch           # different devices, on purpose

Reports of different setups (model, its parameter count, dtype, device or threads) are refused
unless --allow-mismatch: their time deltas are not a regression or a speed-up of anything.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated

import typer

from llmrun.errors import LlmrunError, ThresholdMissed


def compare(
    baseline: Annotated[Path, typer.Argument(help="Report A (the baseline).")],
    candidate: Annotated[Path, typer.Argument(help="Report B, compared with A.")],
    max_regression: Annotated[
        float | None,
        typer.Option("--max-regression", help="Exit 3 when a run's total time grew by more than this percentage."),
    ] = None,
    per_op: Annotated[
        bool, typer.Option("--per-op", help="Gate each op (1%+ of its run) too, not only run totals (profiles).")
    ] = False,
    ops: Annotated[bool, typer.Option("--ops/--totals-only", help="Show every op, or only run totals.")] = True,
    allow_mismatch: Annotated[
        bool,
        typer.Option("--allow-mismatch", help="Compare reports whose model, dtype, device or threads differ."),
    ] = False,
) -> None:
    """Show how much faster or slower B is than A, op by op and in total."""
    from rich.console import Console

    from llmrun.profiler import compare as K

    if max_regression is not None and not (math.isfinite(max_regression) and max_regression >= 0):
        raise LlmrunError(f"--max-regression must be a finite percentage of at least 0, got {max_regression}")
    a, b = K.load_report(baseline), K.load_report(candidate)
    if K.kind(a) != K.kind(b):
        raise LlmrunError(
            f"{baseline} is a {K.kind(a)} report and {candidate} a {K.kind(b)} report; compare two of one kind"
        )
    if per_op and K.kind(a) == "bench":
        raise LlmrunError("--per-op gates the ops of profile reports; bench reports have none (drop --per-op)")
    differ = "; ".join(K.mismatches(a, b))
    if differ and not allow_mismatch:
        raise LlmrunError(
            f"{baseline} and {candidate} are runs of different setups ({differ}); "
            "compare like with like, or pass --allow-mismatch"
        )
    if differ:
        print(f"llmrun: note: comparing different setups ({differ}), as --allow-mismatch asks", file=sys.stderr)
    comparison = K.compare(a, b)
    if not comparison.runs:
        what = "test, batch, threads" if comparison.kind == "bench" else "phase, batch, prompt length"
        raise LlmrunError(f"{baseline} and {candidate} share no run ({what}) to compare")
    K.render(comparison, Console(), show_ops=ops)
    if max_regression is not None:
        reasons = K.regressions(comparison, max_regression, per_op=per_op)
        if reasons:
            more = f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""
            raise ThresholdMissed(f"{reasons[0]}{more}")
