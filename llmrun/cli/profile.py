"""``llmrun profile``: time every named op of prefill and decode and place each on the roofline.

Examples:

    llmrun profile --prompt-len 512 --decode-tokens 32
    llmrun profile --model preset:llama-3.1-8b --random-weights --prompt-len 2048 --batch 1,16 \\
        --decode-tokens 128 --format json --output h200.json --plot h200.png
    llmrun profile --batch 1,4,16,64 --plot sweep.svg          # the path toward the ridge
    llmrun profile --format json --output ci.json --fail-under mbu=0.7,mfu=0.5   # exit 3 when short
    llmrun profile --trace steps.json --plot roof.png --plot-share share.png   # ui.perfetto.dev opens the trace
    llmrun profile --path eager --wide          # the layer-by-layer ops, every column

Decode is timed on the path generate runs (--path fast, each fused op group named by its parts:
o_proj+attn_residual); prefill has no separate fast path and runs eager.

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
    QuantOption,
    RandomWeightsOption,
    RevisionOption,
    ThreadsOption,
    apply_threads,
    check_count,
    check_positive,
    parse_int_list,
)
from llmrun.cli.parallel import TpOption, rank_device, tensor_parallel
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


class DecodePath(str, Enum):
    """The decode path timed: the fast decoder generate runs, or the eager layer-by-layer ops."""

    fast = "fast"
    eager = "eager"


PathOption = Annotated[
    DecodePath, typer.Option("--path", help="Decode path timed: fast (what generate runs) or eager (op by op).")
]
TraceOption = Annotated[
    Path | None, typer.Option("--trace", help="Also write a Chrome/Perfetto trace (.json; ui.perfetto.dev).")
]
PlotShareOption = Annotated[
    Path | None, typer.Option("--plot-share", help="With --plot: also chart each op's share of the time.")
]
WideOption = Annotated[bool, typer.Option("--wide", help="Show every table column, whatever the terminal width.")]


def profile(
    model: ModelOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    revision: RevisionOption = None,
    random_weights: RandomWeightsOption = False,
    quant: QuantOption = None,
    prompt_len: Annotated[
        str, typer.Option("--prompt-len", "-p", help="Prompt length(s) in tokens, e.g. 128,512.")
    ] = "512",
    batch: Annotated[str, typer.Option("--batch", "-b", help="Batch size(s), e.g. 1,16.")] = "1",
    decode_tokens: Annotated[
        int, typer.Option("--decode-tokens", help="Decode steps per repeat after the prefill (0: prefill only).")
    ] = 32,
    repeats: Annotated[int, typer.Option("--repeats", "-r", help="Measured repeats (median and spread reported).")] = 3,
    warmup: Annotated[int, typer.Option("--warmup", help="Unmeasured repeats before the measured ones.")] = 1,
    per_layer: Annotated[bool, typer.Option("--per-layer", help="One row per op per layer, not the mean.")] = False,
    fmt: Annotated[str, typer.Option("--format", "-o", metavar="table|json|csv|md", help="Output format.")] = "table",
    output: Annotated[Path | None, typer.Option("--output", help="Write the report here instead of stdout.")] = None,
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
    seed: Annotated[int, typer.Option("--seed", "-s", help="Seed of the random prompt tokens.")] = 0,
    threads: ThreadsOption = None,
    path: PathOption = DecodePath.fast,
    trace: TraceOption = None,
    plot_share: PlotShareOption = None,
    wide: WideOption = False,
    tp: TpOption = 1,
) -> None:
    """Profile prefill and decode op by op: time, FLOPs, bytes, and % of the roofline."""
    from llmrun.generation.sampling import check_seed
    from llmrun.profiler import report as R
    from llmrun.profiler.profile import ProfileSettings

    fmt = _format(fmt)
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
        path=path.value,
    )
    gates = R.parse_fail_under(fail_under) if fail_under is not None else []
    R.check_gates(gates, settings.phases)
    _check_outputs(output=output, plot=plot, plot_share=plot_share, trace=trace)
    apply_threads(threads)
    joined = tensor_parallel(tp, model, device, threads, revision=revision, random_weights=random_weights)
    rank_dev, parallel = rank_device(joined, device)
    report = _measure(model, rank_dev, dtype, revision, settings, trace, quant, parallel)
    if parallel is not None and parallel.rank != 0:
        return  # rank 0 writes the report: every rank measured its own share, alike
    _write(report, fmt, output, wide=wide)
    _plot(report, plot, plot_share)
    missed = R.missed_thresholds(report, gates)
    if missed:
        raise ThresholdMissed("; ".join(missed))


def _check_outputs(**paths: Path | None) -> None:
    """``LlmrunError`` for an output path that cannot be written, before minutes of measuring, not after."""
    chart = ((".png", ".svg"), "the chart is written as .png or .svg")
    kinds = {"plot": chart, "plot_share": chart, "trace": ((".json",), "the trace is written as .json")}
    for name, path in paths.items():
        flag = "--" + name.replace("_", "-")
        if path is None:
            continue
        suffixes, written_as = kinds.get(name, ((path.suffix.lower(),), ""))
        if path.suffix.lower() not in suffixes:
            raise LlmrunError(f"{flag} {path}: {written_as}")
        if not path.parent.is_dir():
            raise LlmrunError(f"{flag} {path}: the directory {path.parent} does not exist")
    if paths["plot_share"] is not None and paths["plot"] is None:
        raise LlmrunError("--plot-share comes with --plot (the roofline chart); give both")


def _plot(report: dict, plot: Path | None, plot_share: Path | None) -> None:
    """Draw the roofline chart and the share chart where asked, saying where on stderr."""
    from rich.console import Console

    from llmrun.profiler.plot import plot_roofline, plot_shares

    if plot is not None:
        plot_roofline(report, plot)
        Console(stderr=True).print(f"roofline chart written to {plot}", highlight=False)
    if plot_share is not None:
        plot_shares(report, plot_share)
        Console(stderr=True).print(f"time share chart written to {plot_share}", highlight=False)


def _measure(
    model: str | None,
    device: str,
    dtype: str,
    revision: str | None,
    settings: ProfileSettings,
    trace: Path | None,
    quant: str | None = None,
    parallel=None,
) -> dict:
    """Open the session (``parallel``: this rank's shard), then ``run_profile`` with a progress bar and the roofs note.

    On the fast path the decode kernel is chosen first, as generate and bench choose it; CPU prefill's
    attention kernel on every path (``settings.prefill_attention`` of the report).
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from llmrun.loading.session import open_session
    from llmrun.model.quant import is_quantized
    from llmrun.profiler.attention_tuning import tune_prefill_attention
    from llmrun.profiler.profile import run_profile
    from llmrun.profiler.tuning import tune_decode

    session = open_session(
        model, device, dtype, revision=revision, random_weights=settings.random_weights, with_tokenizer=False,
        quant=quant, parallel=parallel,
    )  # fmt: skip
    attention = tune_prefill_attention(session.model)  # measured here (before tune_decode reads the cache)
    if is_quantized(session.model) or (settings.path == "fast" and settings.decode_tokens):
        tune_decode(session.model)  # quantized weights' kernels serve prefill too
    stderr = Console(stderr=True)
    columns = (TextColumn("profiling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=stderr, transient=True, disable=not stderr.is_terminal) as bar:
        task = bar.add_task("profile", total=settings.steps)
        report = run_profile(
            session.model,
            session.name,
            settings,
            on_step=lambda: bar.advance(task),
            on_measure=lambda name: stderr.print(f"measuring the roofs of {name} (once; cached)", highlight=False),
            trace=trace,
        )
    if attention is not None:
        report["settings"]["prefill_attention"] = attention.to_json()
    return report


def _format(name: str) -> Format:
    """``--format``/``-o`` as a ``Format``; a file name there is told to go to ``--output``."""
    try:
        return Format(name)
    except ValueError:
        raise LlmrunError(
            f"-o/--format {name!r} is not a format (table, json, csv or md); write to a file with --output FILE"
        ) from None


def _write(report: dict, fmt: Format, output: Path | None, *, wide: bool) -> None:
    from rich.console import Console

    from llmrun.profiler import report as R

    if fmt is Format.table and output is None:
        console = Console()
        R.render_tables(report, console if console.is_terminal else Console(width=160), wide=wide)
        return
    if fmt is Format.table:
        buffer = Console(file=io.StringIO(), width=160)
        R.render_tables(report, buffer, wide=wide)
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
