"""``llmrun bench``: prompt-processing and token-generation throughput, as llama.cpp's llama-bench.

Examples:

    llmrun bench                                   # pp512 and tg128, 5 repetitions, a Markdown table
    llmrun bench -p 128,512 -n 128 -pg 512,128 -r 3 --dtype bf16
    llmrun bench -o json > bench.json              # versions, commit, device, dtype, threads per run
    llmrun bench --kernel-floor -p 0 -n 128        # decode beside one GEMV pass over all weights
    llmrun bench --model preset:llama-3.1-8b --random-weights -p 2048 -n 128 --device cuda

Each row: mean ± standard deviation of tok/s over the repetitions, the speed of light from the
device roofs (measured once and cached, as ``llmrun profile`` uses) and the fraction reached:
MFU for prefill (pp), MBU for decode (tg). ``--eager`` times the plain eager path instead of the
fast path (preallocated buffers; CUDA graphs on a GPU), whose build time is ``prepare_s``.
"""

from __future__ import annotations

import sys
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
)
from llmrun.errors import LlmrunError


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
    from llmrun.profiler.bench import FORMATS, parse_ints, parse_pairs, plan_tests, render, run_bench

    if output not in FORMATS:
        raise LlmrunError(f"-o {output!r} is not a format; use one of {', '.join(FORMATS)}")
    if warmup < 0:
        raise LlmrunError(f"--warmup must be at least 0, got {warmup}")
    if repetitions < 1:
        raise LlmrunError(f"--repetitions must be at least 1, got {repetitions}")
    apply_threads(threads)
    for flag, value in (("--peak-flops", peak_flops), ("--peak-bandwidth", peak_bandwidth)):
        if value is not None and not value > 0:
            raise LlmrunError(f"{flag} must be a positive number, got {value}")
    prompts = parse_ints(n_prompt, "-p") if n_prompt is not None else [512]
    gens = parse_ints(n_gen, "-n") if n_gen is not None else [128]
    tests = plan_tests(prompts, gens, parse_pairs(pg, "-pg"), parse_ints(batch, "--batch") if batch else [1])
    session = open_session(model, device, dtype, revision=revision, random_weights=random_weights, with_tokenizer=False)
    report = run_bench(
        session.model,
        tests,
        model_name=session.name,
        repetitions=repetitions,
        warmup=warmup,
        fast=not eager,
        kernel_floor=kernel_floor,
        peak_flops=peak_flops,
        peak_bandwidth=peak_bandwidth,
        on_row=lambda row: print(
            f"{row.test} b{row.batch}: {row.tok_s:.2f} ± {row.tok_s_std:.2f} tok/s "
            f"({row.fraction:.1%} {row.fraction_kind.upper()})",
            file=sys.stderr,
        ),
    )
    print(render(report, output))
