"""Prompt handling shared by ``generate`` and ``chat``: reading stdin, chat templates, fitting the context."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from llmrun.errors import LlmrunError


@dataclass(frozen=True)
class PromptSettings:
    """``chat`` None means: use the chat template when the model has one."""

    chat: bool | None = None
    system: str | None = None
    truncate: bool = False


def read_prompt(prompt: str | None) -> str:
    """The prompt argument, or stdin for ``-``/no argument; non-UTF-8 input and empty prompts are refused."""
    if prompt is not None and prompt != "-":
        text = _check_utf8(prompt, "the prompt argument")
    elif prompt is None and sys.stdin.isatty():
        raise LlmrunError("no prompt given; pass it as an argument, or '-' to read stdin")
    else:
        raw = sys.stdin.buffer.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise LlmrunError(f"stdin is not valid UTF-8 (byte {exc.start}); convert the prompt to UTF-8") from None
    if not text.strip():
        raise LlmrunError("the prompt is empty; give some text to continue")
    return text


def _check_utf8(text: str, what: str) -> str:
    """``text`` unchanged, unless it came from bytes that are not UTF-8 (Python keeps them as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LlmrunError(f"{what} is not valid UTF-8 (character {exc.start}); convert it to UTF-8") from None
    return text


def sampling_flags(temperature, top_k, top_p, min_p, repetition_penalty, seed) -> dict[str, Any]:
    """The sampling flags given on the command line (None: not given), as ``SamplingParams`` fields.

    Validated before anything is loaded, so a bad value fails at once and names its flag; the model's
    ``generation_config.json`` fills in the rest later (``llmrun.generation.generation_config.sampling_params``).
    """
    from llmrun.generation.sampling import SamplingParams

    flags = dict(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )
    given = {name: value for name, value in flags.items() if value is not None}
    SamplingParams(**given).validate()
    return given


def chat_messages(text: str, system: str | None) -> list[dict[str, str]]:
    """One user turn, after the system message when there is one."""
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": text}]


def build_prompt(session, text: str, settings: PromptSettings, max_new_tokens: int) -> list[int]:
    """Token ids for ``text``: chat-templated or raw, cut to fit the context when asked."""
    tokenizer = session.tokenizer
    use_chat = tokenizer.has_chat_template if settings.chat is None else settings.chat
    if use_chat and not tokenizer.has_chat_template:
        raise LlmrunError(f"{session.name} has no chat template; use --no-chat")
    if use_chat:
        system = _check_utf8(settings.system, "--system") if settings.system else None
        ids = tokenizer.encode_chat(chat_messages(text, system))
    else:
        if settings.system:
            raise LlmrunError("--system needs chat mode; drop it or use --chat")
        ids = tokenizer.encode(text)
    limit = session.model.args.context_length
    if settings.truncate and len(ids) >= limit:
        ids = ids[-(limit - 1) :]
    return ids
