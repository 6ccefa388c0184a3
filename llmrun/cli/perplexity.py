"""``llmrun perplexity``: perplexity of the model on a text file, in windows of --context tokens.

Examples:

    llmrun perplexity wiki.test.raw --context 512
    llmrun perplexity notes.txt --json | jq .perplexity
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
    RandomWeightsOption,
    RevisionOption,
    ThreadsOption,
    apply_threads,
    check_count,
)
from llmrun.errors import LlmrunError


def perplexity(
    file: Annotated[Path, typer.Argument(help="A UTF-8 text file.")],
    model: ModelOption = None,
    context: Annotated[int, typer.Option("--context", "--ctx-size", "-c", help="Window length in tokens.")] = 512,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    revision: RevisionOption = None,
    random_weights: RandomWeightsOption = False,
    as_json: JsonOption = False,
    threads: ThreadsOption = None,
) -> None:
    """Token-level perplexity (exp of the mean negative log-likelihood) of FILE."""
    from rich.console import Console
    from rich.progress import Progress

    from llmrun.generation.perplexity import perplexity as score
    from llmrun.generation.perplexity import windows
    from llmrun.loading.session import open_session

    check_count(context, "--context", 2)  # the model's own context is checked once it is loaded
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LlmrunError(f"{file} does not exist") from None
    except (UnicodeDecodeError, IsADirectoryError) as exc:
        raise LlmrunError(f"{file} is not a UTF-8 text file ({type(exc).__name__})") from None
    apply_threads(threads)
    session = open_session(model, device, dtype, revision=revision, random_weights=random_weights)
    ids = session.tokenizer.encode(text)
    console = Console(stderr=True)  # no bar unless a terminal: rich leaves a blank line in pipes and logs
    with Progress(console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("scoring", total=len(windows(ids, context)))
        result = score(session.model, ids, context, on_window=lambda: bar.advance(task))
    if as_json:
        print(json.dumps({**asdict(result), "model": session.name, "dtype": session.dtype_name}))
    else:
        print(f"perplexity {result.perplexity:.4f} | nll {result.nll:.4f} nats/token | {result.tokens} tokens")
