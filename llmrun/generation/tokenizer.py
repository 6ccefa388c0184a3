"""Text <-> token ids for a model directory in Hugging Face layout.

Three pieces, each following a reference implementation:

* ``tokenizer.json`` is run by the Rust ``tokenizers`` library, exactly as
  ``transformers.PreTrainedTokenizerFast`` runs it.
* Chat templates are rendered like ``transformers``' ``apply_chat_template``, in a
  sandbox (``llmrun.generation.chat_template``).
* ``StreamDecoder`` is the incremental detokenizer of vLLM
  (``detokenize_incrementally``) and HF ``TextStreamer``: decode a short window
  of ids twice (with and without the newest ones) and print the difference, so
  byte-level tokens never print half a UTF-8 character and SentencePiece-style
  decoders never lose the space in front of a word.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers

from llmrun.errors import LlmrunError
from llmrun.generation.chat_template import ChatTemplate
from llmrun.jsonfiles import read_json_object

_REPLACEMENT_CHAR = "\ufffd"
# Named special tokens a template sees, as in transformers' SPECIAL_TOKENS_ATTRIBUTES.
_TEMPLATE_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
    """A model's tokenizer, chat template and end-of-sequence ids.

    Build it with :meth:`from_dir`. Ids are plain Python ints in ``[0, vocab_size)``.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
        bos_id: int | None = None,
        eos_ids: frozenset[int] = frozenset(),
    ) -> None:
        self._backend = backend
        self._chat_template = ChatTemplate(chat_template) if chat_template is not None else None
        self._special_tokens = dict(special_tokens or {})
        self._special_ids = frozenset(i for i, token in backend.get_added_tokens_decoder().items() if token.special)
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_id: int | None = bos_id
        self.eos_ids: frozenset[int] = eos_ids

    @classmethod
    def from_dir(cls, model_dir: Path) -> Tokenizer:
        """Load ``tokenizer.json`` and its companion files from a Hugging Face model directory.

        The chat template comes from ``chat_template.jinja`` if present (it wins, as in
        transformers), else from ``tokenizer_config.json`` (a string, or a list of
        ``{name, template}`` from which "default" is taken). ``eos_ids`` is the union of
        ``eos_token_id`` in ``generation_config.json`` and ``config.json`` (int or list) and
        the id of ``eos_token`` in ``tokenizer_config.json``; ``bos_id`` is the first of
        ``bos_token_id`` in generation_config, config, then the id of ``bos_token``.

        Raises:
            LlmrunError: ``tokenizer.json`` is missing or unreadable, or a JSON file is corrupt.
        """
        model_dir = Path(model_dir)
        tok_path = model_dir / "tokenizer.json"
        if not tok_path.is_file():
            raise LlmrunError(
                f"{tok_path} is missing: re-download or re-import the model (llmrun needs tokenizer.json)."
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_path))
        except Exception as exc:  # tokenizers raises a bare Exception on parse errors
            raise LlmrunError(
                f"{tok_path} is corrupt ({_first_line(exc)}): re-download or re-import the model."
            ) from exc

        tok_config = read_json_object(model_dir / "tokenizer_config.json")
        gen_config = read_json_object(model_dir / "generation_config.json")
        model_config = read_json_object(model_dir / "config.json")

        special_tokens = {}
        for name in _TEMPLATE_TOKEN_NAMES:
            value = _token_content(tok_config.get(name))
            if value is not None:
                special_tokens[name] = value

        template_path = model_dir / "chat_template.jinja"
        if template_path.is_file():
            chat_template: str | None = template_path.read_text(encoding="utf-8")
        else:
            chat_template = _pick_template(tok_config.get("chat_template"), model_dir)

        eos_ids = set(_ids(gen_config.get("eos_token_id")) + _ids(model_config.get("eos_token_id")))
        eos_tok = special_tokens.get("eos_token")
        if eos_tok is not None and backend.token_to_id(eos_tok) is not None:
            eos_ids.add(backend.token_to_id(eos_tok))

        bos_candidates = _ids(gen_config.get("bos_token_id")) + _ids(model_config.get("bos_token_id"))
        bos_tok = special_tokens.get("bos_token")
        if bos_tok is not None and backend.token_to_id(bos_tok) is not None:
            bos_candidates.append(backend.token_to_id(bos_tok))

        return cls(
            backend,
            chat_template=chat_template,
            special_tokens=special_tokens,
            bos_id=bos_candidates[0] if bos_candidates else None,
            eos_ids=frozenset(eos_ids),
        )

    @property
    def has_chat_template(self) -> bool:
        """Whether the model ships a chat template (``render_chat`` raises without one)."""
        return self._chat_template is not None

    def use_chat_template(self, template: ChatTemplate) -> None:
        """Render chats through ``template`` from now on, instead of the model's own (``--chat-template``)."""
        self._chat_template = template

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` runs tokenizer.json's post-processor (e.g. BOS)."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; bytes that don't form valid UTF-8 become U+FFFD."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """Render ``messages`` (dicts with "role" and "content") through the chat template.

        Same output as transformers' ``apply_chat_template(messages, tokenize=False)``.

        Raises:
            LlmrunError: the model has no chat template, or the template is broken or unsafe.
        """
        if self._chat_template is None:
            raise LlmrunError("This model has no chat template: give one with --chat-template FILE, or use --no-chat.")
        return self._chat_template.render(messages, add_generation_prompt, self._special_tokens)

    def encode_chat(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat, without adding special tokens a second time.

        The template already writes BOS and control tokens, so this encodes with
        ``add_special_tokens=False``, as ``apply_chat_template(tokenize=True)`` does.
        """
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_special_tokens=False)

    def stream_decoder(self, *, skip_special_tokens: bool = True) -> StreamDecoder:
        """A fresh incremental decoder for one generated sequence."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)


class StreamDecoder:
    """Turn generated ids into printable text one id at a time.

    Keeps a window ``ids[prefix:]``: ``ids[prefix:read]`` was already printed and
    only gives context (the space in front of a word, the bytes before a split
    character); ``ids[read:]`` is not printed yet. Each push decodes the window
    with and without the pending ids and returns the new text, or "" while it
    ends in U+FFFD (an incomplete UTF-8 character). Work per push is proportional
    to the window, a few tokens, not to the whole sequence.

    ``"".join(push(i) for i in ids) + flush()`` equals ``decode(ids)``.
    """

    # A UTF-8 character is at most 4 bytes, so a character that starts more than
    # 3 tokens back is complete (or definitely invalid) by now; past this many
    # pending ids, the stable part of the window is printed even if the newest
    # bytes are still incomplete. This bounds the window when a model emits
    # invalid bytes.
    _MAX_PENDING = 4
    _UTF8_TAIL = 3

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._skip_ids = tokenizer._special_ids if skip_special_tokens else frozenset()
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text that is now safe to print (often "")."""
        token_id = int(token_id)
        if token_id in self._skip_ids:
            return ""  # decode() would drop it too; keeping it would only grow the window
        self._ids.append(token_id)
        prefix_text = self._decode(self._prefix, self._read)
        new_text = self._decode(self._prefix, len(self._ids))
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT_CHAR):
            return self._advance(new_text[len(prefix_text) :], len(self._ids))
        if len(self._ids) - self._read > self._MAX_PENDING:
            stable_end = len(self._ids) - self._UTF8_TAIL
            stable_text = self._decode(self._prefix, stable_end)
            if len(stable_text) > len(prefix_text) and new_text.startswith(stable_text):
                return self._advance(stable_text[len(prefix_text) :], stable_end)
        return ""

    def flush(self) -> str:
        """Return whatever is still held back (at the end of generation), and reset."""
        prefix_text = self._decode(self._prefix, self._read)
        new_text = self._decode(self._prefix, len(self._ids))
        self._ids, self._prefix, self._read = [], 0, 0
        return new_text[len(prefix_text) :]

    def _advance(self, text: str, read_end: int) -> str:
        # The printed ids become the next context; drop what lies before it.
        del self._ids[: self._read]
        self._prefix, self._read = 0, read_end - self._read
        return text

    def _decode(self, start: int, end: int) -> str:
        if end <= start:
            return ""
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip)


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _pick_template(value: Any, model_dir: Path) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise LlmrunError(
        f"{model_dir / 'tokenizer_config.json'} has a chat_template without a usable 'default' entry: "
        "add chat_template.jinja to the model directory or use --no-chat."
    )


def _ids(value: Any) -> list[int]:
    """``eos_token_id``/``bos_token_id`` as a list: the field may be absent, an int, or a list of ints."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
