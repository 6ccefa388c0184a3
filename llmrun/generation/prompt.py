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


def prompt_ids(tokenizer: Tokenizer, text: str, settings: PromptSettings, context: int, model_name: str) -> list[int]:
    """Token ids for ``text``: chat-templated or raw; with ``truncate``, the last ones that leave room in
    ``context`` (tokens) for one new token."""
    use_chat = tokenizer.has_chat_template if settings.chat is None else settings.chat
    if use_chat and not tokenizer.has_chat_template:
        raise LlmrunError(f"{model_name} has no chat template; use --no-chat")
    if use_chat:
        ids = tokenizer.encode_chat(chat_messages(text, settings.system))
    else:
        if settings.system:
            raise LlmrunError("--system needs chat mode; drop it or use --chat")
        ids = tokenizer.encode(text)
    if settings.truncate and len(ids) >= context:
        ids = ids[-(context - 1) :]
    return ids
