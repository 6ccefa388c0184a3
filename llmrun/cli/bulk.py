"""``llmrun generate --prompts-file FILE``: every prompt of a file, one JSON line each, run in batches.

The file is read and checked whole before the model loads (``llmrun.generation.prompts_file``): a
bad line is one error naming its line number, exit 2, and nothing runs. The prompts then run in
batches of ``--batch-size`` (``llmrun.generation.batch``); each batch's lines are written, in input
order, as soon as it is done. A progress bar runs on stderr (on a terminal) and a summary line
(prompts/s, tokens/s) ends the run.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Annotated, Any

import typer

from llmrun.errors import LlmrunError

PromptsFileOption = Annotated[
    Path | None,
    typer.Option(
        "--prompts-file",
        metavar="FILE",
        help="One JSON line out per prompt of FILE (.txt: one a line; .jsonl: prompt or messages, and per-prompt "
        "settings), checked whole before loading.",
        show_default=False,
    ),
]
BatchSizeOption = Annotated[int, typer.Option("--batch-size", "-b", help="Prompts run together (--prompts-file).")]
OutputOption = Annotated[
    Path | None,
    typer.Option("--output", metavar="FILE", help="Write the JSON lines to FILE, not stdout.", show_default=False),
]


@dataclass(frozen=True)
class BulkRequest:
    """What ``generate`` was given, for a ``--prompts-file`` run: its parameters of these names, and
    ``given``, the sampling flags set (``llmrun.cli.prompts.generation_flags``)."""

    prompts_file: Path
    prompt: str | None
    prompt_text: str | None
    prompt_file: Path | None
    batch_size: int
    output: Path | None
    model: str | None
    device: str
    dtype: str
    revision: str | None
    random_weights: bool
    quant: str | None
    tp: int
    max_new_tokens: int
    given: dict[str, Any]
    stop: list[str] | None
    chat: bool | None
    system: str | None
    chat_template: Path | None
    truncate: bool
    ignore_eos: bool
    ctx_size: int | None

    @classmethod
    def of(cls, parameters: dict[str, Any]) -> BulkRequest:
        """The request from ``generate``'s parameters by name (its ``locals()``: one line there, whatever they are)."""
        return cls(**{f.name: parameters[f.name] for f in dataclasses.fields(cls)})


def run_bulk(request: BulkRequest) -> None:
    """Check the file and the flags, load the model, run the prompts in batches, write one line each."""
    from llmrun.cli.options import check_count, read_text_file
    from llmrun.cli.prompts import check_utf8, context_size, open_for_generation, read_chat_template
    from llmrun.generation.prompt import PromptSettings
    from llmrun.generation.prompts_file import parse_prompts
    from llmrun.profiler.tuning import tune_decode

    if (request.prompt, request.prompt_text, request.prompt_file) != (None, None, None):
        raise LlmrunError("give a prompt (argument, -p or -f) or --prompts-file, not both")
    if request.tp != 1:
        raise LlmrunError("--prompts-file runs in one process; drop --tp")
    check_count(request.batch_size, "--batch-size", 1)
    path = request.prompts_file
    prompts = parse_prompts(read_text_file(path, "--prompts-file"), path)
    template = read_chat_template(request.chat_template)
    _check_output(request.output)
    session, sampling = open_for_generation(
        request.model, request.device, request.dtype, request.given, template,
        revision=request.revision, random_weights=request.random_weights, quant=request.quant,
    )  # fmt: skip
    system = check_utf8(request.system, "--system") if request.system else None
    settings = PromptSettings(chat=request.chat, system=system, truncate=request.truncate)
    args = session.model.args
    context = context_size(request.ctx_size, args.context_length, args.context_length)
    jobs = [_Job.build(p, request, session, sampling, settings, context) for p in prompts]
    tune_decode(session.model)
    out = _open_output(request.output)
    try:
        _run(jobs, request, session, context, out)
    finally:
        if out is not sys.stdout:
            out.close()


def _check_output(path: Path | None) -> None:
    """Refuse an ``--output`` that cannot be written, before the model loads, without touching what it holds."""
    if path is None:
        return
    existed = path.exists()
    _open_output(path, "a").close()
    if not existed:
        path.unlink()


def _open_output(path: Path | None, mode: str = "w") -> IO[str]:
    """stdout, or ``path`` opened for writing (``_check_output`` has checked it: it is replaced only
    once every prompt is ready to run)."""
    if path is None:
        return sys.stdout
    try:
        return path.open(mode, encoding="utf-8")
    except IsADirectoryError:
        raise LlmrunError(f"--output {path} is a directory; give a file name") from None
    except OSError as exc:
        raise LlmrunError(f"--output {path} cannot be written ({exc.strerror})") from None


@dataclass
class _Job:
    """One prompt of the file, tokenized, with its sampling settings and the row it runs as."""

    prompt: Any  # llmrun.generation.prompts_file.FilePrompt
    row: Any  # llmrun.generation.batch.BatchRow
    sampling: Any  # llmrun.generation.sampling.SamplingParams, with the seed in use
    stop: tuple[str, ...]

    @classmethod
    def build(cls, prompt, request: BulkRequest, session, base, settings, context: int) -> _Job:
        """The job of ``prompt``; a prompt that cannot run is an ``LlmrunError`` naming its line."""
        from llmrun.generation.batch import BatchRow
        from llmrun.generation.generate import check_prompt_fits
        from llmrun.generation.prompt import prompt_ids
        from llmrun.generation.sampling import Sampler

        max_new = prompt.max_new_tokens or request.max_new_tokens
        try:
            if prompt.messages is None:
                ids = prompt_ids(session.tokenizer, prompt.text, settings, context, session.name, max_new)
            elif not session.tokenizer.has_chat_template:
                raise LlmrunError(f"{session.name} has no chat template, so 'messages' cannot be used")
            else:
                ids = session.tokenizer.encode_chat(prompt.messages)
            check_prompt_fits(len(ids), context, session.model)
        except LlmrunError as exc:
            raise LlmrunError(f"{prompt.where(request.prompts_file)}: {exc}") from None
        sampler = Sampler(dataclasses.replace(base, **prompt.sampling), session.device)
        sampling = dataclasses.replace(sampler.params, seed=sampler.seed)  # the seed in use, drawn when none was given
        stop = prompt.stop if prompt.stop is not None else tuple(request.stop or ())
        return cls(prompt, BatchRow(ids, sampler, max_new), sampling, stop)


def _run(jobs: list[_Job], request: BulkRequest, session, context: int, out: IO[str]) -> None:
    """Every batch in turn, its lines written as it ends; the progress bar and the summary on stderr."""
    from rich.console import Console
    from rich.progress import Progress

    from llmrun.generation.batch import generate_batch

    stop_ids = () if request.ignore_eos else session.tokenizer.eos_ids
    console = Console(stderr=True)  # no bar unless a terminal: rich leaves a blank line in pipes and logs
    t0 = time.perf_counter()
    generated = 0
    with Progress(console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("prompts", total=len(jobs))

        def stepped(tokens: int) -> None:
            nonlocal generated
            generated += tokens
            rate = generated / (time.perf_counter() - t0)
            bar.update(task, description=f"prompts ({generated} tokens, {rate:.1f} tok/s)")

        for first in range(0, len(jobs), request.batch_size):
            batch = jobs[first : first + request.batch_size]
            rows = [job.row for job in batch]
            generate_batch(session.model, rows, stop_ids=stop_ids, ctx_size=context, on_step=stepped)
            for job in batch:
                out.write(json.dumps(_result(job, session), ensure_ascii=False) + "\n")
            out.flush()
            bar.advance(task, len(batch))
    generated = sum(job.row.stats.generated_tokens for job in jobs)  # after --stop strings cut some rows
    elapsed = time.perf_counter() - t0
    print(
        f"{len(jobs)} prompts in {elapsed:.2f} s | {len(jobs) / elapsed:.2f} prompts/s | "
        f"{generated} tokens | {generated / elapsed:.1f} tok/s | batch {request.batch_size}",
        file=sys.stderr,
    )


def _result(job: _Job, session) -> dict[str, Any]:
    """``generate --json``'s object for one prompt, with its ``index``, ``line`` and (if given) ``id``."""
    from llmrun.cli.generate import json_result
    from llmrun.generation.generate import stream_text

    row = job.row
    kept: list[int] = []

    def consumed():  # the ids stream_text reads before it stops at a --stop string, as generate records them
        for token in row.tokens:
            kept.append(token)
            yield token

    text = "".join(stream_text(consumed(), session.tokenizer.stream_decoder(), job.stop, row.stats))
    row.stats.generated_tokens = len(kept)
    result = json_result(session, text, kept, row.stats, job.sampling)
    extra = {"index": job.prompt.index, "line": job.prompt.line}
    if job.prompt.id is not None:
        extra["id"] = job.prompt.id
    return {**extra, **result}
