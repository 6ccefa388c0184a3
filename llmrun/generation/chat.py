"""A multi-turn conversation that fits a context window: the messages, and the KV cache that holds them.

Each turn's prompt is the whole conversation through the chat template; the cache keeps what the
model has already seen, so only the new part is prefilled (``Conversation.shared_prefix``). The
cache starts no larger than the turn needs and grows, up to ``ctx_size`` tokens, as the
conversation does. When a turn and the room for its answer no longer fit, the oldest turns are
dropped (a system message stays) and the cache is rebuilt for what remains.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmrun.errors import LlmrunError
from llmrun.generation.generate import Conversation
from llmrun.generation.tokenizer import Tokenizer
from llmrun.model.transformer import Transformer

INITIAL_CACHE = 1024  # positions the cache starts with (at most ctx_size); it doubles as needed


@dataclass
class ChatPrompt:
    """One turn's prompt: its token ids and how many earlier exchanges were dropped to make room."""

    ids: list[int]
    dropped_turns: int = 0


@dataclass
class ChatSession:
    """Messages of a conversation and its cache, kept within ``ctx_size`` tokens.

    ``max_new_tokens`` is the room (tokens) kept free for each answer when old turns must go.
    """

    model: Transformer
    tokenizer: Tokenizer
    ctx_size: int
    max_new_tokens: int
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    conversation: Conversation | None = None

    def __post_init__(self) -> None:
        if not self.tokenizer.has_chat_template:
            raise LlmrunError(
                "this model has no chat template; give one with --chat-template FILE, "
                "or use 'llmrun generate --no-chat' for plain text"
            )
        self.reset()

    def reset(self) -> None:
        """Start over: only the system message (if any) remains; the cache is forgotten."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        if self.conversation is not None:
            self.conversation.tokens = []
            self.conversation.cache.reset()

    def prompt(self, text: str) -> ChatPrompt:
        """Add the user's ``text`` and return the prompt for the answer, dropping old turns if it must.

        Raises:
            LlmrunError: the message alone (with the system message) leaves no room for an answer in
                ``ctx_size``; it is not added, and the conversation stays as it was.
        """
        messages = [*self.messages, {"role": "user", "content": text}]
        ids = self.tokenizer.encode_chat(messages)
        dropped = 0
        while len(ids) + self.max_new_tokens > self.ctx_size and _drop_oldest_turn(messages, bool(self.system)):
            dropped += 1
            ids = self.tokenizer.encode_chat(messages)
        if len(ids) >= self.ctx_size:
            raise LlmrunError(
                f"this message makes a {len(ids)}-token prompt, and the chat's context is {self.ctx_size} "
                "tokens; send a shorter message (or start chat with a larger --ctx-size)"
            )
        self.messages = messages
        self._reserve(min(len(ids) + self.max_new_tokens, self.ctx_size))
        return ChatPrompt(ids, dropped)

    def answered(self, text: str) -> None:
        """Record the assistant's answer to the last prompt."""
        self.messages.append({"role": "assistant", "content": text})

    def _reserve(self, positions: int) -> None:
        """A cache of at least ``positions`` (doubling from its size, at most ``ctx_size``)."""
        if self.conversation is None:
            self.conversation = Conversation(self.model, min(max(INITIAL_CACHE, positions), self.ctx_size))
        cache = self.conversation.cache
        size = cache.max_seq_len
        while size < positions:
            size *= 2
        cache.grow(min(size, self.ctx_size))


def _drop_oldest_turn(messages: list[dict[str, str]], has_system: bool) -> bool:
    """Remove the oldest user message and the answers to it; False when only the newest message is left."""
    first = 1 if has_system else 0
    users = [i for i, m in enumerate(messages) if i >= first and m["role"] == "user"]
    if len(users) < 2:
        return False
    del messages[first : users[1]]
    return True
