"""``llmrun compare``: per-op and total time deltas between two ``llmrun profile --format json`` reports.

Examples:

    llmrun compare before.json after.json
    llmrun compare main.json pr.json --max-regression 5          # exit 3 if a run got >5% slower
    llmrun compare main.json pr.json --max-regression 10 --per-op
"""

from __future__ import annotations

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
        bool, typer.Option("--per-op", help="Gate each op (1%+ of its run) too, not only run totals.")
    ] = False,
    ops: Annotated[bool, typer.Option("--ops/--totals-only", help="Show every op, or only run totals.")] = True,
) -> None:
    """Show how much faster or slower B is than A, op by op and in total."""
    from rich.console import Console

    from llmrun.profiler import compare as K

    if max_regression is not None and max_regression < 0:
        raise LlmrunError(f"--max-regression must be a percentage of at least 0, got {max_regression}")
    comparison = K.compare(K.load_report(baseline), K.load_report(candidate))
    if not comparison.runs:
        raise LlmrunError(f"{baseline} and {candidate} share no run (phase, batch, prompt length) to compare")
    K.render(comparison, Console(), show_ops=ops)
    if max_regression is not None:
        reasons = K.regressions(comparison, max_regression, per_op=per_op)
        if reasons:
            more = f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""
            raise ThresholdMissed(f"{reasons[0]}{more}")
