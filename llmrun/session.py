"""A loaded model with its tokenizer, device and dtype: what every command that runs a model needs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from llmrun.devices import DTYPE_NAMES, resolve_device, resolve_dtype
from llmrun.loader import load_model
from llmrun.model import Transformer
from llmrun.sources import DEFAULT_MODEL, resolve_model
from llmrun.tokenizer import Tokenizer


@dataclass
class Session:
    """The model (on ``device`` in ``dtype``), its tokenizer, and where it came from."""

    model: Transformer
    tokenizer: Tokenizer
    model_dir: Path
    name: str
    device: torch.device
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        """``bf16``, ``fp16`` or ``fp32``."""
        return DTYPE_NAMES[self.dtype]


def open_session(
    spec: str | None, device: str = "auto", dtype: str = "auto", *, revision: str | None = None
) -> Session:
    """Resolve ``spec`` (see ``llmrun.sources``), then load its tokenizer and weights.

    Device and dtype are checked first, so a bad flag fails before anything is downloaded.
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    model_dir = resolve_model(spec, revision=revision)
    tokenizer = Tokenizer.from_dir(model_dir)
    model = load_model(model_dir, torch_device, torch_dtype)
    return Session(model, tokenizer, model_dir, spec or DEFAULT_MODEL, torch_device, torch_dtype)
