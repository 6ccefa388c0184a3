"""A prompt as token ids: raw text, or one user turn through the model's chat template, fitted to the context."""

from __future__ import annotations

from dataclasses import dataclass

from llmrun.errors import LlmrunError
from llmrun.generation.tokenizer import Tokenizer


@dataclass(frozen=True)
class PromptSettings:
    """How to turn text into a prompt. ``chat`` None means: the chat template when the model has one."""

    chat: bool | None = None
    system: str | None = None
    truncate: bool = False


def chat_messages(text: str, system: str | None) -> list[dict[str, str]]:
    """One user turn, after the system message when there is one."""
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": text}]


def prompt_ids(
    tokenizer: Tokenizer, text: str, settings: PromptSettings, context: int, model_name: str, max_new_tokens: int = 1
) -> list[int]:
    """Token ids for ``text``: chat-templated or raw.

    With ``settings.truncate`` a prompt that leaves less than ``max_new_tokens`` of ``context``
    (tokens) for the answer keeps its last tokens; in chat mode only the user's text is cut, never
    the template or the system message.
    """
    use_chat = tokenizer.has_chat_template if settings.chat is None else settings.chat
    if (use_chat or settings.system) and not tokenizer.has_chat_template:
        what = "--system needs a chat template, and" if settings.system else "--chat:"
        raise LlmrunError(f"{what} {model_name} has no chat template; give one with --chat-template FILE")
    if not use_chat and settings.system:
        raise LlmrunError("--system needs chat mode; drop --no-chat or --system")
    room = context - min(max_new_tokens, context - 1)  # prompt tokens that leave room for the answer
    if use_chat:
        ids = tokenizer.encode_chat(chat_messages(text, settings.system))
        if settings.truncate and len(ids) > room:
            ids = _cut_chat(tokenizer, text, settings.system, room)
        return ids
    ids = tokenizer.encode(text)
    return ids[-room:] if settings.truncate and len(ids) > room else ids


def _cut_chat(tokenizer: Tokenizer, text: str, system: str | None, room: int) -> list[int]:
    """The chat prompt of the last part of ``text`` that fits in ``room`` tokens with its template."""
    frame = len(tokenizer.encode_chat(chat_messages("", system)))
    if frame >= room:
        raise LlmrunError(
            f"the chat template and system message alone take {frame} tokens, and the prompt may have {room}; "
            "use a larger --ctx-size, a smaller --max-new-tokens, or a shorter --system"
        )
    keep = tokenizer.encode(text, add_special_tokens=False)[-(room - frame) :]
    while True:  # decoding and re-encoding can merge tokens differently: shorten until it fits
        ids = tokenizer.encode_chat(chat_messages(tokenizer.decode(keep), system))
        if len(ids) <= room:
            return ids
        keep = keep[len(ids) - room :]
