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
    apply_threads,
)
from llmrun.cli.prompts import sampling_flags
from llmrun.errors import LlmrunError


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
) -> None:
    """Chat with the model in the terminal."""
    from llmrun.generation.generate import Conversation, GenerationStats, generate_tokens, stream_text
    from llmrun.generation.generation_config import sampling_params
    from llmrun.generation.sampling import Sampler
    from llmrun.loading.session import open_session

    if max_new_tokens <= 0:
        raise LlmrunError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    given = sampling_flags(temperature, top_k, top_p, min_p, repetition_penalty, seed)
    apply_threads(threads)
    session = open_session(model, device, dtype, revision=revision, random_weights=random_weights)
    tokenizer = session.tokenizer
    if not tokenizer.has_chat_template:
        raise LlmrunError(f"{session.name} has no chat template; use 'llmrun generate --no-chat' instead")
    sampler = Sampler(sampling_params(given, session.model_dir), session.device)
    conversation = Conversation(session.model, session.model.args.context_length)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
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
            messages = list(start)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        ids = tokenizer.encode_chat(messages)
        stats = GenerationStats()
        tokens = generate_tokens(
            session.model,
            ids,
            sampler,
            max_new_tokens=max_new_tokens,
            stop_ids=tokenizer.eos_ids,
            stats=stats,
            conversation=conversation,
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
        messages.append({"role": "assistant", "content": "".join(answer)})
        print(
            f"[{stats.generated_tokens} tok, {stats.decode_tok_s:.1f} tok/s, {stats.reused_tokens} cached prompt tok]",
            file=sys.stderr,
        )
