"""``llmrun chat``: an interactive multi-turn conversation that re-uses the KV cache between turns.

Type a message and press Enter (end a line with a backslash to go on, or put several lines
between two lines of three double quotes); ``/help`` lists the commands, ``/reset`` starts over,
``/exit`` or Ctrl-D quits. Ctrl-C while the model answers stops that answer and keeps what it said.

Examples:

    llmrun chat
    llmrun chat --system "Answer in one sentence." --temperature 0
    llmrun chat -m ./base-model --chat-template chatml.jinja   # a model that ships no template
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from llmrun.cli.chat_input import ChatInput, command_of, help_text, message_of
from llmrun.cli.options import (
    ChatTemplateOption,
    CtxSizeOption,
    DeviceOption,
    DtypeOption,
    MinPOption,
    ModelOption,
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
from llmrun.cli.parallel import SharedInput, TpOption, tensor_parallel
from llmrun.cli.prompts import context_size, generation_flags, open_for_generation, read_chat_template
from llmrun.errors import LlmrunError
from llmrun.paths import llmrun_home

DEFAULT_CTX_SIZE = 4096  # tokens a chat keeps, at most the model's context


def chat(
    model: ModelOption = None,
    system: Annotated[str | None, typer.Option(help="System message.")] = None,
    chat_template: ChatTemplateOption = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Most tokens per answer.")] = 512,
    temperature: TemperatureOption = None,
    top_k: TopKOption = None,
    top_p: TopPOption = None,
    min_p: MinPOption = None,
    repetition_penalty: RepetitionPenaltyOption = None,
    seed: SeedOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    revision: RevisionOption = None,
    random_weights: RandomWeightsOption = False,
    quant: QuantOption = None,
    threads: ThreadsOption = None,
    ctx_size: CtxSizeOption = None,
    tp: TpOption = 1,
) -> None:
    """Chat with the model in the terminal."""
    from llmrun.generation.chat import ChatSession
    from llmrun.generation.sampling import Sampler
    from llmrun.profiler.tuning import tune_decode

    given = generation_flags(
        max_new_tokens, threads, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, seed=seed,
    )  # fmt: skip
    ranks = tensor_parallel(tp, model, device, threads, revision=revision, random_weights=random_weights)
    template = read_chat_template(chat_template)
    session, sampling = open_for_generation(
        model, device, dtype, given, template, ranks, revision=revision, random_weights=random_weights, quant=quant
    )
    ctx_size = context_size(ctx_size, session.model.args.context_length, DEFAULT_CTX_SIZE)
    chat_session = ChatSession(session.model, session.tokenizer, ctx_size, max_new_tokens, system)
    tune_decode(session.model)
    sampler = Sampler(sampling, session.device)
    print("llmrun chat: /help lists the commands, /exit or Ctrl-D quits", file=sys.stderr)
    reader = SharedInput(ranks, lambda: ChatInput(llmrun_home() / "chat_history"))  # rank 0 reads, all answer
    try:
        _converse(reader, session, chat_session, sampler, max_new_tokens)
    finally:
        reader.close()


def _converse(reader: SharedInput, session, chat_session, sampler, max_new_tokens: int) -> None:
    """Read messages and commands until /exit or the end of input; answer each message."""
    while (text := reader.read()) is not None:
        command = command_of(text)
        if command == "/exit":
            return
        if command == "/help":
            print(help_text(), file=sys.stderr)
        elif command == "/reset":
            chat_session.reset()
            print("llmrun: the conversation starts over", file=sys.stderr)
        elif command is not None:
            print(f"llmrun: unknown command {command}; /help lists the commands", file=sys.stderr)
        elif text.strip():
            _turn(session, chat_session, message_of(text), sampler, max_new_tokens)
    print(file=sys.stderr)


def _turn(session, chat_session, text: str, sampler, max_new_tokens: int) -> None:
    """One message: fit it into the conversation (or say why not) and answer it."""
    try:
        prompt = chat_session.prompt(text)
    except LlmrunError as exc:  # this message does not fit; the conversation goes on without it
        print(f"llmrun: error: {exc}", file=sys.stderr)
        return
    if prompt.dropped_turns:
        print(
            f"llmrun: the conversation filled the {chat_session.ctx_size}-token context; "
            f"dropped the {prompt.dropped_turns} oldest turn(s)",
            file=sys.stderr,
        )
    _answer(session, chat_session, prompt.ids, sampler, max_new_tokens)


def _answer(session, chat_session, ids: list[int], sampler, max_new_tokens: int) -> None:
    """Stream the model's answer to ``ids``, record it in the conversation, and print the turn's statistics."""
    from llmrun.generation.generate import GenerationStats, generate_tokens, stream_text

    tokenizer = session.tokenizer
    stats = GenerationStats()
    tokens = generate_tokens(
        session.model,
        ids,
        sampler,
        max_new_tokens=max_new_tokens,
        stop_ids=tokenizer.eos_ids,
        stats=stats,
        conversation=chat_session.conversation,
    )
    answer = []
    try:
        for chunk in stream_text(tokens, tokenizer.stream_decoder(), (), stats):
            answer.append(chunk)
            sys.stdout.write(chunk)
            sys.stdout.flush()
    except KeyboardInterrupt:
        stats.finish_reason = "interrupted"
    print()
    chat_session.answered("".join(answer))
    print(
        f"[{stats.generated_tokens} tok, ttft {stats.ttft_s:.2f} s, {stats.decode_tok_s:.1f} tok/s, "
        f"{stats.reused_tokens} cached prompt tok]",
        file=sys.stderr,
    )
