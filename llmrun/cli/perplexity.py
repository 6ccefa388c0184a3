"""``llmrun perplexity``: perplexity of the model on a text file, in windows of --context tokens.

Examples:

    llmrun perplexity wiki.test.raw --context 512
    llmrun perplexity notes.txt --json | jq .perplexity
    llmrun perplexity wiki.test.raw -c 512 --llama-cpp      # the number llama-perplexity prints
    llmrun perplexity notes.txt -c 1024 --stride 256         # sliding windows, every token once
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from llmrun.cli.options import (
    DeviceOption,
    DtypeOption,
    JsonOption,
    ModelOption,
    QuantOption,
    RandomWeightsOption,
    RevisionOption,
    ThreadsOption,
    apply_threads,
    check_count,
    read_text_file,
)
from llmrun.cli.parallel import TpOption, rank_device, tensor_parallel
from llmrun.errors import LlmrunError


def perplexity(
    file: Annotated[Path | None, typer.Argument(help="A UTF-8 text file (or -f FILE).", show_default=False)] = None,
    text_file: Annotated[
        Path | None, typer.Option("--file", "-f", help="The text file, as llama-perplexity's -f.", show_default=False)
    ] = None,
    model: ModelOption = None,
    context: Annotated[int, typer.Option("--context", "--ctx-size", "-c", help="Window length in tokens.")] = 512,
    stride: Annotated[
        int | None,
        typer.Option(
            help="Start a window every N tokens (scoring what the last did not). Default: --context.",
            show_default=False,
        ),
    ] = None,
    llama_cpp: Annotated[
        bool,
        typer.Option(
            "--llama-cpp",
            help="Score as llama-perplexity: windows of --context, BOS first, the second "
            "half of each scored (with --stride: its --ppl-stride).",
        ),
    ] = False,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    revision: RevisionOption = None,
    random_weights: RandomWeightsOption = False,
    quant: QuantOption = None,
    as_json: JsonOption = False,
    threads: ThreadsOption = None,
    tp: TpOption = 1,
) -> None:
    """Token-level perplexity (exp of the mean negative log-likelihood) of FILE."""
    from llmrun.loading.session import open_session
    from llmrun.profiler.attention_tuning import tune_prefill_attention
    from llmrun.profiler.quant_tuning import tune_quant

    check_count(context, "--context", 2)  # the model's own context is checked once it is loaded
    if stride is not None:
        check_count(stride, "--stride", 1)  # at most --context: checked with it, once the model is loaded
    if (file is None) == (text_file is None):
        raise LlmrunError("give the text file once: llmrun perplexity FILE, or -f FILE")
    text = read_text_file(file or text_file)
    apply_threads(threads)
    ranks = tensor_parallel(tp, model, device, threads, revision=revision, random_weights=random_weights)
    device, parallel = rank_device(ranks, device)
    session = open_session(
        model, device, dtype, revision=revision, random_weights=random_weights, quant=quant, parallel=parallel
    )
    tune_quant(session.model)  # each quantized weight kind's kernel, measured (nothing to do for float weights)
    tune_prefill_attention(session.model)  # CPU prefill's attention kernel, measured
    ids = session.tokenizer.encode(text)
    tokenizer = session.tokenizer
    bos = tokenizer.bos_id if llama_cpp and tokenizer.encode("")[:1] == [tokenizer.bos_id] else None  # BOS it adds
    result = _score(session.model, ids, context, stride=stride, llama_cpp=llama_cpp, bos=bos)
    if as_json:
        print(json.dumps({**asdict(result), "model": session.name, "dtype": session.dtype_name}))
    else:
        print(
            f"perplexity {result.perplexity:.4f} ± {result.perplexity_stderr:.5f} | nll {result.nll:.4f} "
            f"± {result.nll_stderr:.5f} nats/token | {result.tokens} tokens in {result.windows} windows ({result.mode})"
        )


def _score(model, ids: list[int], context: int, **how):
    """``llmrun.generation.perplexity.perplexity`` under a progress bar with the running estimate (on a terminal)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from llmrun.generation.perplexity import perplexity, plan_windows

    total = len(plan_windows(model, len(ids), context, **how))
    console = Console(stderr=True)  # no bar unless a terminal: rich leaves a blank line in pipes and logs
    columns = (TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[ppl]}"))
    hidden = not console.is_terminal
    with Progress(*columns, TimeRemainingColumn(), console=console, transient=True, disable=hidden) as bar:
        task = bar.add_task("scoring", total=total, ppl="")

        def advance(running: float) -> None:
            bar.update(task, advance=1, ppl=f"ppl {running:.4f}")

        return perplexity(model, ids, context, advance, **how)
