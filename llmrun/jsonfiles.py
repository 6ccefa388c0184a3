"""Reading the JSON files that sit beside a model's weights (tokenizer and generation configs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmrun.errors import LlmrunError


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, or {} when the file does not exist.

    Raises:
        LlmrunError: the file is not UTF-8 JSON, or holds something other than an object.
    """
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LlmrunError(f"{path} is corrupt ({exc}): re-download or re-import the model.") from None
    if not isinstance(data, dict):
        raise LlmrunError(f"{path} is corrupt (not a JSON object): re-download or re-import the model.")
    return data
