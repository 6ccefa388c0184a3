"""``llmrun chat``: an interactive multi-turn conversation that re-uses the KV cache between turns.

Type a message and press Enter; ``/reset`` starts over, ``/exit`` or Ctrl-D quits. Ctrl-C while
the model answers stops that answer and keeps what it said.

Examples:

    llmrun chat
    llmrun chat --system "Answer in one sentence." --temperature 0
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from llmrun.cli.options import (
    CtxSizeOption,
    DeviceOption,
    DtypeOption,
    MinPOption,
    ModelOption,
    RandomWeightsOption,
    RepetitionPenaltyOption,
    RevisionOption,
    SeedOption,
    TemperatureOption,
    ThreadsOption,
    TopKOption,
    TopPOption,
)
from llmrun.cli.prompts import context_size, generation_flags, open_for_generation
from llmrun.errors import LlmrunError

DEFAULT_CTX_SIZE = 4096  # tokens a chat keeps, at most the model's context


def chat(
    model: ModelOption = None,
    system: Annotated[str | None, typer.Option(help="System message.")] = None,
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
    threads: ThreadsOption = None,
    ctx_size: CtxSizeOption = None,
) -> None:
    """Chat with the model in the terminal."""
    from llmrun.generation.chat import ChatSession
    from llmrun.generation.sampling import Sampler

    given = generation_flags(
        max_new_tokens, threads, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, seed=seed,
    )  # fmt: skip
    session, sampling = open_for_generation(
        model, device, dtype, given, revision=revision, random_weights=random_weights
    )
    tokenizer = session.tokenizer
    if not tokenizer.has_chat_template:
        raise LlmrunError(f"{session.name} has no chat template; use 'llmrun generate --no-chat' instead")
    sampler = Sampler(sampling, session.device)
    ctx_size = context_size(ctx_size, session.model.args.context_length, DEFAULT_CTX_SIZE)
    chat_session = ChatSession(session.model, tokenizer, ctx_size, max_new_tokens, system)
    print("llmrun chat: /reset starts over, /exit or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            chat_session.reset()
            continue
        if not line.strip():
            continue
        try:
            prompt = chat_session.prompt(line)
        except LlmrunError as exc:  # this message does not fit; the conversation goes on without it
            print(f"llmrun: error: {exc}", file=sys.stderr)
            continue
        if prompt.dropped_turns:
            print(
                f"llmrun: the conversation filled the {ctx_size}-token context; "
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
        f"[{stats.generated_tokens} tok, {stats.decode_tok_s:.1f} tok/s, {stats.reused_tokens} cached prompt tok]",
        file=sys.stderr,
    )
