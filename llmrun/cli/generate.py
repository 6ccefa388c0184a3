"""``llmrun generate``: complete a prompt (or answer it, for chat models) and stream the text.

Examples:

    llmrun generate "The capital of France is" --no-chat --temperature 0
    echo "Write a haiku about GPUs" | llmrun generate - --max-new-tokens 64
    llmrun generate "Hi" --json --seed 1 | jq .decode_tok_s
    llmrun generate --prompts-file prompts.jsonl --batch-size 8 --temperature 0 > answers.jsonl
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated

import typer

from llmrun.cli.bulk import BatchSizeOption, BulkRequest, OutputOption, PromptsFileOption, run_bulk
from llmrun.cli.options import (
    ChatTemplateOption,
    CtxSizeOption,
    DeviceOption,
    DtypeOption,
    JsonOption,
    MinPOption,
    ModelOption,
    PromptFileOption,
    PromptOption,
    QuantOption,
    RandomWeightsOption,
    RepetitionPenaltyOption,
    RevisionOption,
    SeedOption,
    TemperatureOption,
    ThreadsOption,
    TopKOption,
    TopPOption,
)
from llmrun.cli.parallel import TpOption, rank0_input, tensor_parallel
from llmrun.cli.prompts import (
    check_utf8,
    context_size,
    generation_flags,
    open_for_generation,
    read_chat_template,
    read_prompt,
)

if TYPE_CHECKING:
    from llmrun.generation.sampling import SamplingParams


def generate(
    prompt: Annotated[
        str | None, typer.Argument(help="The prompt; '-' or nothing reads it from stdin.", show_default=False)
    ] = None,
    prompt_text: PromptOption = None,
    prompt_file: PromptFileOption = None,
    model: ModelOption = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Most tokens to generate.")] = 256,
    temperature: TemperatureOption = None,
    top_k: TopKOption = None,
    top_p: TopPOption = None,
    min_p: MinPOption = None,
    repetition_penalty: RepetitionPenaltyOption = None,
    seed: SeedOption = None,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Stop before this text (repeatable).")] = None,
    chat: Annotated[
        bool | None,
        typer.Option("--chat/--no-chat", help="Use the chat template. Default: when the model has one."),
    ] = None,
    system: Annotated[str | None, typer.Option(help="System message (chat mode).")] = None,
    chat_template: ChatTemplateOption = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Keep going to --max-new-tokens.")] = False,
    truncate: Annotated[
        bool,
        typer.Option("--truncate", help="Cut a prompt too long for the context, keeping its end."),
    ] = False,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    revision: RevisionOption = None,
    random_weights: RandomWeightsOption = False,
    quant: QuantOption = None,
    as_json: JsonOption = False,
    threads: ThreadsOption = None,
    ctx_size: CtxSizeOption = None,
    prompts_file: PromptsFileOption = None,
    batch_size: BatchSizeOption = 1,
    output: OutputOption = None,
    tp: TpOption = 1,
) -> None:
    """Generate text from a prompt, streaming it to stdout; statistics go to stderr."""
    from llmrun.generation.generate import GenerationStats, generate_tokens
    from llmrun.generation.prompt import PromptSettings, prompt_ids
    from llmrun.generation.sampling import Sampler
    from llmrun.profiler.tuning import tune_decode

    given = generation_flags(max_new_tokens, threads, temperature=temperature, top_k=top_k, top_p=top_p,
                             min_p=min_p, repetition_penalty=repetition_penalty, seed=seed)  # fmt: skip
    if prompts_file is not None:  # one JSON line per prompt of the file: llmrun.cli.bulk
        return run_bulk(BulkRequest.of(locals()))
    ranks = tensor_parallel(tp, model, device, threads, revision=revision, random_weights=random_weights)
    text = rank0_input(ranks, lambda: read_prompt(prompt, prompt_text, prompt_file))
    template = read_chat_template(chat_template)
    session, sampling = open_for_generation(
        model, device, dtype, given, template, ranks, revision=revision, random_weights=random_weights, quant=quant
    )
    settings = PromptSettings(chat=chat, system=check_utf8(system, "--system") if system else None, truncate=truncate)
    context = context_size(ctx_size, session.model.args.context_length, session.model.args.context_length)
    ids = prompt_ids(session.tokenizer, text, settings, context, session.name, max_new_tokens)
    tune_decode(session.model)
    stats = GenerationStats()
    sampler = Sampler(sampling, session.device)
    sampling = dataclasses.replace(sampling, seed=sampler.seed)  # the seed in use, drawn when none was given
    tokens = generate_tokens(
        session.model,
        ids,
        sampler,
        max_new_tokens=max_new_tokens,
        ctx_size=context,
        stop_ids=() if ignore_eos else session.tokenizer.eos_ids,
        stats=stats,
    )
    _stream(session, tokens, stop or (), stats, sampling, as_json)


def _stream(session, tokens: Iterator[int], stop, stats, sampling: SamplingParams, as_json: bool) -> None:
    """Decode ``tokens`` to text (printed as it comes unless ``as_json``), then ``_finish``, also after Ctrl-C."""
    from llmrun.generation.generate import stream_text

    generated: list[int] = []
    chunks = stream_text(_recorded(tokens, generated), session.tokenizer.stream_decoder(), stop, stats)
    pieces: list[str] = []
    try:
        for chunk in chunks:
            pieces.append(chunk)
            if not as_json:
                sys.stdout.write(chunk)
                sys.stdout.flush()
    except KeyboardInterrupt:
        stats.finish_reason = "interrupted"
        _finish(session, "".join(pieces), generated, stats, sampling, as_json)
        raise
    _finish(session, "".join(pieces), generated, stats, sampling, as_json)


def _recorded(tokens: Iterator[int], generated: list[int]) -> Iterator[int]:
    """``tokens``, each also appended to ``generated``; closing this closes ``tokens`` (its stats end there)."""
    try:
        for token in tokens:
            generated.append(token)
            yield token
    finally:
        tokens.close()


def _finish(session, text: str, generated: list[int], stats, sampling: SamplingParams, as_json: bool) -> None:
    """The JSON object on stdout (``--json``), or the end of the streamed text and the statistics line on stderr."""
    if as_json:
        print(json.dumps(json_result(session, text, generated, stats, sampling), ensure_ascii=False), flush=True)
    else:
        print(flush=True)
        _print_stats(stats, sampling.seed)


def json_result(session, text: str, generated: list[int], stats, sampling: SamplingParams) -> dict:
    """One generation as ``-o json`` prints it (each of a prompts file's results too, one per line):
    the text and token ids, the counts, why it stopped, timings in seconds and the sampling settings."""
    return {
        "text": text,
        "tokens": generated,
        "prompt_tokens": stats.prompt_tokens,
        "generated_tokens": stats.generated_tokens,
        "finish_reason": stats.finish_reason,
        "ttft_s": stats.ttft_s,
        "prefill_s": stats.prefill_s,
        "decode_s": stats.decode_s,
        "prefill_tok_s": stats.prefill_tok_s,
        "decode_tok_s": stats.decode_tok_s,
        "model": session.name,
        "model_dir": str(session.model_dir),
        "device": str(session.device),
        "dtype": session.dtype_name,
        "sampling": dataclasses.asdict(sampling),  # what was used: flags, else generation_config.json, else defaults
    }


def _print_stats(stats, seed: int) -> None:
    print(
        f"prompt {stats.prompt_tokens} tok | ttft {stats.ttft_s:.3f} s | prefill {stats.prefill_tok_s:.1f} tok/s | "
        f"decode {stats.decode_tok_s:.1f} tok/s | seed {seed} | {stats.generated_tokens} tok ({stats.finish_reason})",
        file=sys.stderr,
    )
