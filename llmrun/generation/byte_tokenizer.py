"""UTF-8 bytes as token ids, for models without a tokenizer (presets with random weights).

``ByteTokenizer`` maps UTF-8 bytes to ids 0..255 and shows any other id as ``<N>``; it has the
interface of ``llmrun.generation.tokenizer.Tokenizer``, with no chat template, BOS or EOS.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from llmrun.errors import LlmrunError


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, for models without a tokenizer (random-weight presets).

    Same interface as ``llmrun.generation.tokenizer.Tokenizer``; there is no chat template, BOS or EOS, so
    generation always runs to ``--max-new-tokens``. Ids of 256 and above have no text and decode
    as ``<N>``.
    """

    has_chat_template = False
    bos_id: int | None = None
    eos_ids: frozenset[int] = frozenset()

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 256:
            raise LlmrunError(f"a byte tokenizer needs a vocabulary of at least 256 ids, the model has {vocab_size}")
        self.vocab_size = vocab_size

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """The UTF-8 bytes of ``text``."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Bytes as UTF-8 (invalid sequences become U+FFFD), other ids as ``<N>``."""
        decoder = self.stream_decoder()
        return "".join(decoder.push(i) for i in ids) + decoder.flush()

    def render_chat(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """Always refused: there is no chat template."""
        raise LlmrunError("this model has no tokenizer or chat template (random weights): use --no-chat")

    def encode_chat(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> list[int]:
        """Always refused: there is no chat template."""
        return self.encode(self.render_chat(messages, add_generation_prompt=add_generation_prompt))

    def stream_decoder(self, *, skip_special_tokens: bool = True) -> ByteStreamDecoder:
        """A fresh incremental decoder (holds back incomplete UTF-8 characters)."""
        return ByteStreamDecoder()


class ByteStreamDecoder:
    """``push(id) -> str`` and ``flush() -> str`` for ``ByteTokenizer`` ids, UTF-8 safe."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Text now complete after ``token_id`` (often "" inside a multi-byte character)."""
        if 0 <= token_id < 256:
            return self._utf8.decode(bytes([token_id]))
        return self.flush() + f"<{token_id}>"

    def flush(self) -> str:
        """Whatever is held back (an incomplete character becomes U+FFFD), and reset."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
