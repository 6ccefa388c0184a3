"""The one reader of llmrun's JSON files: model configs, tokenizer and generation configs, presets,
shard indexes, cached roofs, the GPU spec table and profile reports."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llmrun.errors import LlmrunError

REDOWNLOAD = "re-download or re-import the model"


def read_json_object(path: Path, *, missing: str | None = None, fix: str = REDOWNLOAD) -> dict[str, Any]:
    """The JSON object in ``path``.

    Args:
        path: the file.
        missing: None lets an absent file read as {}; otherwise an absent file is an error, and this
            text says what to do about it.
        fix: what to do about a file that is not a UTF-8 JSON object, for the error message.

    Raises:
        LlmrunError: the file is absent (when ``missing`` is given), unreadable, not UTF-8 JSON, or
            holds something other than an object.
    """
    path = Path(path)
    if not path.is_file():
        if missing is None:
            return {}
        what = "is a directory, not a JSON file" if path.is_dir() else "is missing"
        raise LlmrunError(f"{path} {what}: {missing}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise LlmrunError(f"cannot read {path}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LlmrunError(f"{path} is corrupt ({exc}): {fix}.") from None
    if not isinstance(data, dict):
        raise LlmrunError(f"{path} is corrupt (not a JSON object): {fix}.")
    return data


def read_cache(path: Path) -> dict[str, Any]:
    """The JSON object in a cache llmrun rebuilds (measured roofs, kernel choices): {} where the file is
    absent, unreadable or corrupt, so that what it held is measured again and the file rewritten whole."""
    try:
        return read_json_object(path)
    except LlmrunError:
        return {}


def write_json_atomic(path: Path, data: object) -> None:
    """Write ``data`` as indented UTF-8 JSON to ``path`` through a temporary file and a rename.

    The temporary file is this process's own (named by its pid), so processes writing the same
    file at once (the ranks of a tensor-parallel run caching a measurement) each replace it whole:
    the last rename wins, and no writer finds its temporary file renamed away by another.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
