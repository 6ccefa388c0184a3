"""``llmrun bench``: prompt-processing and token-generation throughput, as llama.cpp's llama-bench.

Examples:

    llmrun bench                                   # pp512 and tg128, 5 repetitions, a Markdown table
    llmrun bench -p 128,512 -n 128 -pg 512,128 -r 3 --dtype bf16
    llmrun bench -o json > bench.json              # versions, commit, device, dtype, threads per run
    llmrun bench -t 1,2 -b 1,4 -p 128 -n 32        # every combination, as llama-bench runs them
    llmrun bench --kernel-floor -p 0 -n 128        # decode beside one GEMV pass over all weights
    llmrun bench --model preset:llama-3.1-8b --random-weights -p 2048 -n 128 --device cuda

Each row: mean ± standard deviation of tok/s over the repetitions, the speed of light from the
device roofs (measured once and cached, as ``llmrun profile`` uses) and the fraction reached:
MFU when the compute roof binds (pp, on most devices), MBU when the memory roof binds (tg), SOL
for pp+tg (docs/roofline.md). ``--eager`` times the plain eager path instead of the fast path
(preallocated buffers; CUDA graphs on a GPU), whose build time is ``prepare_s``. Ctrl-C prints
the rows finished so far (``"interrupted": true`` in JSON) and exits 130.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer

from llmrun.cli.options import (
    MAX_THREADS,
    DeviceOption,
    DtypeOption,
    ModelOption,
    QuantOption,
    RandomWeightsOption,
    RevisionOption,
    check_count,
    check_positive,
    parse_int_list,
)
from llmrun.cli.parallel import TpOption, rank_device, tensor_parallel
from llmrun.errors import LlmrunError

IntList = list[str] | None  # comma-separated integers; the flag may be repeated


def _list_option(*names: str, help: str) -> Any:
    """A typer option taking integers separated by commas (parsed by ``parse_int_list``)."""
    return typer.Option(*names, help=help, metavar="N,N,...", show_default=False)


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
        f"{row.test} b{row.batch} t{row.threads}: {row.tok_s:.2f} ± {row.tok_s_std:.2f} tok/s "
        f"({row.fraction:.1%} {row.fraction_kind.upper()})",
        file=sys.stderr,
    )


def _tests(n_prompt: IntList, n_gen: IntList, pg: IntList, batch: IntList, threads: IntList, n_ctx: int):
    """The bench tests -p, -n, -pg, -b, -t and -c ask for (llama-bench's defaults: pp512, tg128; batch 1)."""
    from llmrun.profiler.bench.plan import plan_tests

    prompts = parse_int_list(n_prompt, "-p", minimum=0) if n_prompt else [512]
    gens = parse_int_list(n_gen, "-n", minimum=0) if n_gen else [128]
    batches = parse_int_list(batch, "--batch") if batch else [1]
    counts = parse_int_list(threads, "--threads", maximum=MAX_THREADS) if threads else [0]
    return plan_tests(prompts, gens, parse_pairs(pg, "-pg"), batches, n_ctx, counts)


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
        IntList, _list_option("--n-prompt", "-p", help="Prompt lengths (pp tests). Default: 512.")
    ] = None,
    n_gen: Annotated[
        IntList, _list_option("--n-gen", "-n", help="Generation lengths (tg tests). Default: 128.")
    ] = None,
    pg: Annotated[
        IntList,
        typer.Option(
            "--pg", "-pg", metavar="P,G", help="A pp+tg test of P prompt and G generated tokens (repeatable)."
        ),
    ] = None,
    batch: Annotated[IntList, _list_option("--batch", "-b", help="Batch sizes (sequences). Default: 1.")] = None,
    threads: Annotated[IntList, _list_option("--threads", "-t", help="CPU thread counts. Default: torch's.")] = None,
    repetitions: Annotated[int, typer.Option("--repetitions", "-r", help="Timed repetitions per test.")] = 5,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed repetitions before the timed ones.")] = 1,
    fmt: Annotated[str, typer.Option("--format", "-o", metavar="md|csv|json|jsonl", help="Output format.")] = "md",
    ctx_size: Annotated[
        int | None,
        typer.Option(
            "--ctx-size", "-c", help="KV cache size of every test. Default: what it fills.", show_default=False
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
    quant: QuantOption = None,
    tp: TpOption = 1,
) -> None:
    """Benchmark prefill (pp) and decode (tg) throughput against the speed of light."""
    from llmrun.profiler.bench.render import FORMATS

    if fmt not in FORMATS:
        raise LlmrunError(f"-o {fmt!r} is not a format; use one of {', '.join(FORMATS)}")
    _check_numbers(warmup, repetitions, ctx_size, peak_flops, peak_bandwidth)
    tests = _tests(n_prompt, n_gen, pg, batch, threads, ctx_size or 0)
    if kernel_floor and not any(t.n_gen and not t.n_prompt for t in tests):
        raise LlmrunError("--kernel-floor is measured beside tg tests, and there are none; add -n N (N > 0)")
    ranks = tensor_parallel(tp, model, device, None, revision=revision, random_weights=random_weights)
    _run(tests, fmt, model, device, dtype, revision, random_weights, peak_flops, peak_bandwidth, ranks=ranks,
         repetitions=repetitions, warmup=warmup, fast=not eager, kernel_floor=kernel_floor, quant=quant)  # fmt: skip


def _run(
    tests, fmt: str, model, device, dtype, revision, random_weights, peak_flops, peak_bandwidth, *, quant=None,
    ranks=None, **bench,
) -> None:  # fmt: skip
    """Open the model (``ranks``: this rank's shard, ``llmrun.cli.parallel``), check the tests, select the
    roofs, run and print; after Ctrl-C print the rows finished so far, then let the interrupt end the
    command (exit 130)."""
    from llmrun.loading.session import open_session
    from llmrun.profiler.attention_tuning import tune_prefill_attention
    from llmrun.profiler.bench.plan import check_tests
    from llmrun.profiler.bench.render import render
    from llmrun.profiler.bench.run import run_bench
    from llmrun.profiler.roofs import select_roofs
    from llmrun.profiler.tuning import tune_decode

    device, parallel = rank_device(ranks, device)
    session = open_session(
        model, device, dtype, revision=revision, random_weights=random_weights, with_tokenizer=False, quant=quant,
        parallel=parallel,
    )  # fmt: skip
    check_tests(session.model, tests)  # before the roofs are measured
    roofs = select_roofs(
        session.device,
        session.dtype_name,
        peak_flops=peak_flops,
        peak_bandwidth=peak_bandwidth,
        on_measure=lambda name: print(f"measuring the roofs of {name} (once; cached)", file=sys.stderr),
    )
    attention = tune_prefill_attention(session.model)  # measured here (before tune_decode reads the cache)
    choice = tune_decode(session.model) if bench["fast"] else None
    report = run_bench(session.model, tests, roofs, model_name=session.name, checked=True, on_row=_print_row, **bench)
    if choice is not None:
        report.env["cpu_gemv"] = choice.to_json()
    if attention is not None:
        report.env["prefill_attention"] = attention.to_json()
    print(render(report, fmt), flush=True)
    if report.interrupted:
        raise KeyboardInterrupt
