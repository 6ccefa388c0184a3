"""A file of prompts for ``generate --prompts-file``: read and checked whole before anything runs.

Two formats, by the file's name:

* ``*.jsonl`` (or ``*.json``): one JSON object a line, with ``prompt`` (text, through the chat
  template as a prompt argument would be) or ``messages`` (a chat, ``[{"role", "content"}, ...]``,
  always through the template), and optional per-prompt settings: ``max_new_tokens``,
  ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``, ``seed`` (-1: random),
  ``stop`` (a string or a list of them) and ``id`` (any JSON value, echoed in the output);
* anything else: plain text, one prompt a line.

Blank lines are skipped (line numbers still count them). Every problem is an ``LlmrunError``
naming the file and the line, raised before any prompt runs (the caller reads the file: ``parse_prompts``
takes its text).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmrun.errors import LlmrunError
from llmrun.generation.sampling import RANDOM_SEED, SamplingParams

MAX_NEW_TOKENS = 2**31 - 1  # the largest budget a prompt may ask for (as the --max-new-tokens flag)

# Per-prompt sampling settings: key -> the type its value must have (bool is refused where a number is asked).
SAMPLING_KEYS: dict[str, type | tuple[type, ...]] = {
    "temperature": (int, float),
    "top_k": int,
    "top_p": (int, float),
    "min_p": (int, float),
    "repetition_penalty": (int, float),
    "seed": int,
}
KEYS = ("prompt", "messages", "max_new_tokens", "stop", "id", *SAMPLING_KEYS)


@dataclass(frozen=True)
class FilePrompt:
    """One prompt of the file: ``text`` or ``messages``, and the settings it overrides.

    ``line`` is its 1-based line number, ``index`` its 0-based place among the prompts;
    ``max_new_tokens`` and ``stop`` are None where the line does not set them (the flags decide);
    ``sampling`` holds the ``SamplingParams`` fields the line sets (``seed`` None: a random one).
    """

    line: int
    index: int
    text: str | None = None
    messages: list[dict[str, str]] | None = None
    max_new_tokens: int | None = None
    stop: tuple[str, ...] | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    id: Any = None

    def where(self, path: Path | str) -> str:
        """``FILE line N``, the prefix of every message about this prompt."""
        return f"{path} line {self.line}"


def parse_prompts(text: str, path: Path) -> list[FilePrompt]:
    """Every prompt of the text of the file ``path``, in file order; ``LlmrunError`` naming the line of the
    first bad one. The format follows the file's name (``.jsonl``/``.json``: JSON lines, else plain text)."""
    is_json = path.suffix.lower() in (".jsonl", ".json")
    prompts: list[FilePrompt] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        if is_json:
            prompts.append(_json_prompt(line, number, len(prompts), where))
        else:
            prompts.append(FilePrompt(line=number, index=len(prompts), text=line))
    if not prompts:
        raise LlmrunError(f"{path} holds no prompt (every line is blank)")
    return prompts


def _json_prompt(line: str, number: int, index: int, where: str) -> FilePrompt:
    """The prompt of one JSON line."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise LlmrunError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise LlmrunError(f"{where}: expected a JSON object with a prompt or messages, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(KEYS))
    if unknown:
        raise LlmrunError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(KEYS)})")
    if ("prompt" in obj) == ("messages" in obj):
        raise LlmrunError(f"{where}: give exactly one of 'prompt' (text) and 'messages' (a chat)")
    text = messages = None
    if "prompt" in obj:
        text = obj["prompt"]
        if not isinstance(text, str) or not text.strip():
            raise LlmrunError(f"{where}: 'prompt' must be a non-empty string")
    else:
        messages = _messages(obj["messages"], where)
    return FilePrompt(
        line=number,
        index=index,
        text=text,
        messages=messages,
        max_new_tokens=_max_new_tokens(obj.get("max_new_tokens"), where),
        stop=_stop(obj.get("stop"), where),
        sampling=_sampling(obj, where),
        id=obj.get("id"),
    )


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    """A chat: a non-empty list of {"role": str, "content": str}."""
    fields = ("role", "content")
    ok = isinstance(value, list) and value
    ok = ok and all(isinstance(m, dict) and all(isinstance(m.get(k), str) for k in fields) for m in value)
    if not ok:
        raise LlmrunError(f"{where}: 'messages' must be a non-empty list of objects with string role and content")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _max_new_tokens(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_NEW_TOKENS:
        raise LlmrunError(f"{where}: 'max_new_tokens' must be an integer from 1 to {MAX_NEW_TOKENS}, got {value!r}")
    return value


def _stop(value: Any, where: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise LlmrunError(f"{where}: 'stop' must be a string or a list of strings")
    return tuple(stops)


def _sampling(obj: dict[str, Any], where: str) -> dict[str, Any]:
    """The sampling settings the line gives, type- and range-checked as the flags are."""
    given: dict[str, Any] = {}
    for key, kind in SAMPLING_KEYS.items():
        if key not in obj:
            continue
        value = obj[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            wanted = "an integer" if kind is int else "a number"
            raise LlmrunError(f"{where}: {key!r} must be {wanted}, got {value!r}")
        given[key] = None if key == "seed" and value == RANDOM_SEED else value
    try:
        SamplingParams(**given).validate()
    except LlmrunError as exc:  # the flag's message ("--top-k must be ..."), named as the line's key (top_k)
        flag, rest = str(exc).split(" ", 1)
        raise LlmrunError(f"{where}: {flag.removeprefix('--').replace('-', '_')} {rest}") from None
    return given
