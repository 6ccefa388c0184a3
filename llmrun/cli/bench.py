"""``llmrun bench``: prompt-processing and token-generation throughput, as llama.cpp's llama-bench.

Examples:

    llmrun bench                                   # pp512 and tg128, 5 repetitions, a Markdown table
    llmrun bench -p 128,512 -n 128 -pg 512,128 -r 3 --dtype bf16
    llmrun bench -o json > bench.json              # versions, commit, device, dtype, threads per run
    llmrun bench --kernel-floor -p 0 -n 128        # decode beside one GEMV pass over all weights
    llmrun bench --model preset:llama-3.1-8b --random-weights -p 2048 -n 128 --device cuda

Each row: mean ± standard deviation of tok/s over the repetitions, the speed of light from the
device roofs (measured once and cached, as ``llmrun profile`` uses) and the fraction reached:
MFU when the compute roof binds (pp, on most devices), MBU when the memory roof binds (tg), SOL
for pp+tg (docs/roofline.md). ``--eager`` times the plain eager path instead of the fast path
(preallocated buffers; CUDA graphs on a GPU), whose build time is ``prepare_s``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Annotated

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
from llmrun.errors import LlmrunError


def _check_numbers(
    warmup: int, repetitions: int, ctx_size: int | None, peak_flops: float | None, peak_bandwidth: float | None
) -> None:
    """Every numeric flag of bench in range (exit 2 naming the flag otherwise)."""
    check_count(warmup, "--warmup", 0)
    check_count(repetitions, "--repetitions", 1)
    if ctx_size is not None:
        check_count(ctx_size, "--ctx-size", 1)
    check_positive(peak_flops, "--peak-flops")
    check_positive(peak_bandwidth, "--peak-bandwidth")


def _print_row(row) -> None:
    """One finished test on stderr, as the run goes."""
    print(
        f"{row.test} b{row.batch}: {row.tok_s:.2f} ± {row.tok_s_std:.2f} tok/s "
        f"({row.fraction:.1%} {row.fraction_kind.upper()})",
        file=sys.stderr,
    )


def _tests(
    n_prompt: list[str] | None, n_gen: list[str] | None, pg: list[str] | None, batch: list[str] | None, n_ctx: int
):
    """The bench tests -p, -n, -pg, --batch and -c ask for (llama-bench's defaults: pp512, tg128, batch 1)."""
    from llmrun.profiler.bench.plan import plan_tests

    prompts = parse_int_list(n_prompt, "-p", minimum=0) if n_prompt is not None else [512]
    gens = parse_int_list(n_gen, "-n", minimum=0) if n_gen is not None else [128]
    batches = parse_int_list(batch, "--batch") if batch else [1]
    return plan_tests(prompts, gens, parse_pairs(pg, "-pg"), batches, n_ctx)


def parse_pairs(values: Sequence[str] | None, flag: str) -> list[tuple[int, int]]:
    """``["512,128"]`` -> [(512, 128)]: a prompt length and a generation length per value."""
    pairs = []
    for value in values or ():
        numbers = parse_int_list(value, flag, minimum=0)
        if len(numbers) != 2:
            raise LlmrunError(f"{flag} expects PROMPT,GEN (e.g. 512,128), got {value!r}")
        pairs.append((numbers[0], numbers[1]))
    return pairs


def bench(
    model: ModelOption = None,
    n_prompt: Annotated[
        list[str] | None,
        typer.Option("--n-prompt", "-p", help="Prompt lengths (pp tests), e.g. 128,512.", show_default="512"),
    ] = None,
    n_gen: Annotated[
        list[str] | None,
        typer.Option("--n-gen", "-n", help="Generation lengths for tg tests, e.g. 128 (0: none).", show_default="128"),
    ] = None,
    pg: Annotated[
        list[str] | None,
        typer.Option("--pg", "-pg", help="Combined prompt+generation test PROMPT,GEN, e.g. 512,128 (repeatable)."),
    ] = None,
    repetitions: Annotated[int, typer.Option("--repetitions", "-r", help="Timed repetitions per test.")] = 5,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed repetitions before the timed ones.")] = 1,
    batch: Annotated[
        list[str] | None, typer.Option("--batch", "-b", help="Batch sizes, e.g. 1,4.", show_default="1")
    ] = None,
    output: Annotated[str, typer.Option("--output", "-o", help="Output format: md, csv, json or jsonl.")] = "md",
    threads: ThreadsOption = None,
    ctx_size: Annotated[
        int | None,
        typer.Option(
            "--ctx-size", "-c", help="KV cache capacity of every test (default: what it fills).", show_default=False
        ),
    ] = None,
    eager: Annotated[bool, typer.Option("--eager", help="Time the eager decode path, not the fast path.")] = False,
    kernel_floor: Annotated[
        bool, typer.Option("--kernel-floor", help="Also time one GEMV pass over all weights beside each tg row.")
    ] = False,
    peak_flops: Annotated[
        float | None, typer.Option("--peak-flops", help="Compute roof in FLOP/s instead of the measured one.")
    ] = None,
    peak_bandwidth: Annotated[
        float | None, typer.Option("--peak-bandwidth", help="Memory roof in bytes/s instead of the measured one.")
    ] = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    revision: RevisionOption = None,
    random_weights: RandomWeightsOption = False,
) -> None:
    """Benchmark prefill (pp) and decode (tg) throughput against the speed of light."""
    from llmrun.loading.session import open_session
    from llmrun.profiler.bench.plan import check_tests
    from llmrun.profiler.bench.render import FORMATS, render
    from llmrun.profiler.bench.run import run_bench
    from llmrun.profiler.roofs import select_roofs
    from llmrun.profiler.tuning import tune_decode

    if output not in FORMATS:
        raise LlmrunError(f"-o {output!r} is not a format; use one of {', '.join(FORMATS)}")
    _check_numbers(warmup, repetitions, ctx_size, peak_flops, peak_bandwidth)
    apply_threads(threads)
    tests = _tests(n_prompt, n_gen, pg, batch, ctx_size or 0)
    session = open_session(model, device, dtype, revision=revision, random_weights=random_weights, with_tokenizer=False)
    check_tests(session.model, tests)  # before the roofs are measured
    roofs = select_roofs(
        session.device,
        session.dtype_name,
        peak_flops=peak_flops,
        peak_bandwidth=peak_bandwidth,
        on_measure=lambda name: print(f"measuring the roofs of {name} (once; cached)", file=sys.stderr),
    )
    choice = None if eager else tune_decode(session.model)
    report = run_bench(
        session.model,
        tests,
        roofs,
        model_name=session.name,
        repetitions=repetitions,
        warmup=warmup,
        fast=not eager,
        kernel_floor=kernel_floor,
        on_row=_print_row,
    )
    if choice is not None:
        report.env["cpu_gemv"] = choice.to_json()
    print(render(report, output))
