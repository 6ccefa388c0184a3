"""Open a GGUF file and read its key/value metadata: typed, decoded once, checked for the ``llama`` architecture."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gguf import GGUFReader, GGUFValueType
from gguf.gguf_reader import ReaderField

from llmrun.errors import LlmrunError


class Metadata:
    """Typed access to a GGUF file's key/value metadata, each key decoded once on first use."""

    def __init__(self, fields: dict[str, ReaderField]) -> None:
        self._fields = fields
        self._decoded: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        """Value of ``key`` (str, int, float, bool or a list of those), or ``default`` when absent."""
        if key not in self._fields:
            return default
        if key not in self._decoded:
            self._decoded[key] = _field_value(key, self._fields[key])
        return self._decoded[key]

    def require(self, key: str) -> Any:
        """Value of ``key``; a missing key is an ``LlmrunError``."""
        value = self.get(key)
        if value is None:
            raise LlmrunError(f"The GGUF file lacks the metadata key {key!r}; it cannot be imported.")
        return value


def check_gguf_file(path: Path) -> None:
    """Refuse a ``path`` that does not exist or is a directory, naming which."""
    if path.is_dir():
        raise LlmrunError(f"{path} is a directory, not a GGUF file; give the path of a .gguf file")
    if not path.is_file():
        raise LlmrunError(f"GGUF file {path} does not exist; check the path")


def open_reader(path: Path) -> GGUFReader:
    """Parse the GGUF header, metadata and tensor index (tensor data stays memory-mapped)."""
    check_gguf_file(path)
    try:
        return GGUFReader(path, "r")
    except Exception as exc:  # the reader raises ValueError, IndexError, KeyError, ... on bad bytes
        raise LlmrunError(
            f"{path} is not a readable GGUF file (truncated or corrupt: {type(exc).__name__}: {exc}); "
            "download it again."
        ) from exc


def _field_value(key: str, field: ReaderField) -> Any:
    """Decode one GGUF metadata field into Python values (strings are UTF-8)."""
    try:
        if field.types[0] == GGUFValueType.ARRAY:
            if field.types[-1] == GGUFValueType.STRING:
                return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
            return [field.parts[i][0].item() for i in field.data]
        if field.types[0] == GGUFValueType.STRING:
            return bytes(field.parts[field.data[0]]).decode("utf-8")
        return field.parts[field.data[0]][0].item()
    except (IndexError, UnicodeDecodeError) as exc:
        raise LlmrunError(f"The GGUF metadata key {key!r} is corrupt ({exc}); download the file again.") from exc


def check_architecture(meta: Metadata, path: Path) -> None:
    """Only ``general.architecture == "llama"`` is imported."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise LlmrunError(
            f"{path.name} holds a {arch!r} model, but only the 'llama' architecture can be imported; "
            "use a Llama-family GGUF."
        )


def f32_meta(value: float) -> float:
    """A float32 metadata value as the short decimal it was written from (9.99999975e-06 -> 1e-05)."""
    return float(f"{value:.7g}")
