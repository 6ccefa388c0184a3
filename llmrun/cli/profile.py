"""``llmrun profile``: time every named op of prefill and decode and place each on the roofline.

Examples:

    llmrun profile --prompt-len 512 --decode-tokens 32
    llmrun profile --model preset:llama-3.1-8b --random-weights --prompt-len 2048 --batch 1,16 \\
        --decode-tokens 128 --format json --output h200.json --plot h200.png
    llmrun profile --batch 1,4,16,64 --plot sweep.svg          # the path toward the ridge
    llmrun profile --format json --output ci.json --fail-under mbu=0.7,mfu=0.5   # exit 3 when short

--fail-under gates MBU on decode and MFU on prefill; write decode.mfu=X or prefill.mbu=X to gate
the other way round. A gate with nothing to check (decode with --decode-tokens 0) is refused, as
is --roofs spec or nvml where that source has no figures (the spec table lists GPUs only).
"""

from __future__ import annotations

import io
import sys
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from llmrun.cli.options import (
    DeviceOption,
    DtypeOption,
    ModelOption,
    RandomWeightsOption,
    RevisionOption,
    ThreadsOption,
    apply_threads,
    check_count,
    check_positive,
    parse_int_list,
)
from llmrun.errors import LlmrunError, ThresholdMissed

if TYPE_CHECKING:
    from llmrun.profiler.profile import ProfileSettings


class Format(str, Enum):
    """Output formats of ``llmrun profile``."""

    table = "table"
    json = "json"
    csv = "csv"
    md = "md"


class RoofSource(str, Enum):
    """Which source's roofs the percentages divide by."""

    measured = "measured"
    spec = "spec"
    nvml = "nvml"


def profile(
    model: ModelOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    revision: RevisionOption = None,
    random_weights: RandomWeightsOption = False,
    prompt_len: Annotated[str, typer.Option("--prompt-len", help="Prompt length(s) in tokens, e.g. 128,512.")] = "512",
    batch: Annotated[str, typer.Option("--batch", help="Batch size(s), e.g. 1,16.")] = "1",
    decode_tokens: Annotated[
        int, typer.Option("--decode-tokens", help="Decode steps per repeat after the prefill (0: prefill only).")
    ] = 32,
    repeats: Annotated[int, typer.Option("--repeats", help="Measured repeats (median and spread reported).")] = 3,
    warmup: Annotated[int, typer.Option("--warmup", help="Unmeasured repeats before the measured ones.")] = 1,
    per_layer: Annotated[bool, typer.Option("--per-layer", help="One row per op per layer, not the mean.")] = False,
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.table,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the report here instead of stdout.")
    ] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Also draw the roofline chart (.png or .svg).")] = None,
    fail_under: Annotated[
        str | None,
        typer.Option("--fail-under", help="Exit 3 when short, e.g. mbu=0.7,mfu=0.5 (MBU gates decode, MFU prefill)."),
    ] = None,
    roofs: Annotated[RoofSource, typer.Option("--roofs", help="Roofs for the percentages.")] = RoofSource.measured,
    peak_flops: Annotated[
        float | None, typer.Option("--peak-flops", help="Override the compute roof (FLOP/s, e.g. 989e12).")
    ] = None,
    peak_bandwidth: Annotated[
        float | None, typer.Option("--peak-bandwidth", help="Override the memory roof (bytes/s, e.g. 4.8e12).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random prompt tokens.")] = 0,
    threads: ThreadsOption = None,
) -> None:
    """Profile prefill and decode op by op: time, FLOPs, bytes, and % of the roofline."""
    from rich.console import Console

    from llmrun.generation.sampling import check_seed
    from llmrun.profiler import report as R
    from llmrun.profiler.profile import ProfileSettings

    check_count(repeats, "--repeats", 1)
    check_count(warmup, "--warmup", 0)
    check_count(decode_tokens, "--decode-tokens", 0)
    check_positive(peak_flops, "--peak-flops")
    check_positive(peak_bandwidth, "--peak-bandwidth")
    check_seed(seed)
    settings = ProfileSettings(
        prompt_lens=tuple(dict.fromkeys(parse_int_list(prompt_len, "--prompt-len"))),
        batches=tuple(dict.fromkeys(parse_int_list(batch, "--batch"))),
        decode_tokens=decode_tokens,
        repeats=repeats,
        warmup=warmup,
        per_layer=per_layer,
        seed=seed,
        roofs=roofs.value,
        peak_flops=peak_flops,
        peak_bandwidth=peak_bandwidth,
        random_weights=random_weights,
    )
    gates = R.parse_fail_under(fail_under) if fail_under is not None else []
    R.check_gates(gates, settings.phases)
    if plot is not None and plot.suffix.lower() not in (".png", ".svg"):
        raise LlmrunError(f"--plot {plot}: the chart is written as .png or .svg")
    for flag, path in (("--output", output), ("--plot", plot)):
        if path is not None and not path.parent.is_dir():  # refuse before minutes of measuring, not after
            raise LlmrunError(f"{flag} {path}: the directory {path.parent} does not exist")
    apply_threads(threads)
    report = _measure(model, device, dtype, revision, settings)
    _write(report, fmt, output)
    if plot is not None:
        from llmrun.profiler.plot import plot_roofline

        plot_roofline(report, plot)
        Console(stderr=True).print(f"roofline chart written to {plot}", highlight=False)
    missed = R.missed_thresholds(report, gates)
    if missed:
        raise ThresholdMissed("; ".join(missed))


def _measure(model: str | None, device: str, dtype: str, revision: str | None, settings: ProfileSettings) -> dict:
    """Open the session, then ``run_profile`` with a progress bar and the roofs note on stderr."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from llmrun.loading.session import open_session
    from llmrun.profiler.profile import run_profile

    session = open_session(
        model, device, dtype, revision=revision, random_weights=settings.random_weights, with_tokenizer=False
    )
    stderr = Console(stderr=True)
    columns = (TextColumn("profiling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=stderr, transient=True, disable=not stderr.is_terminal) as bar:
        task = bar.add_task("profile", total=settings.steps)
        return run_profile(
            session.model,
            session.name,
            settings,
            on_step=lambda: bar.advance(task),
            on_measure=lambda name: stderr.print(f"measuring the roofs of {name} (once; cached)", highlight=False),
        )


def _write(report: dict, fmt: Format, output: Path | None) -> None:
    from rich.console import Console

    from llmrun.profiler import report as R

    if fmt is Format.table and output is None:
        console = Console()
        R.render_tables(report, console if console.is_terminal else Console(width=160))
        return
    if fmt is Format.table:
        buffer = Console(file=io.StringIO(), width=160)
        R.render_tables(report, buffer)
        text = buffer.file.getvalue()
    else:
        text = {Format.json: R.to_json, Format.csv: R.to_csv, Format.md: R.to_markdown}[fmt](report)
    if output is None:
        sys.stdout.write(text)
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise LlmrunError(f"--output {output}: cannot write ({exc.strerror})") from None
