"""A loaded model with its tokenizer, device and dtype: what every command that runs a model needs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from llmrun.config import ModelArgs
from llmrun.devices import DTYPE_NAMES, resolve_device, resolve_dtype
from llmrun.errors import LlmrunError
from llmrun.loader import load_model
from llmrun.model import Transformer
from llmrun.presets import ByteTokenizer, is_preset, load_preset, random_model
from llmrun.sources import DEFAULT_MODEL, resolve_model
from llmrun.tokenizer import Tokenizer


@dataclass
class Session:
    """The model (on ``device`` in ``dtype``), its tokenizer, and where it came from."""

    model: Transformer
    tokenizer: Tokenizer | ByteTokenizer
    model_dir: Path
    name: str
    device: torch.device
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        """``bf16``, ``fp16`` or ``fp32``."""
        return DTYPE_NAMES[self.dtype]


def open_session(
    spec: str | None,
    device: str = "auto",
    dtype: str = "auto",
    *,
    revision: str | None = None,
    random_weights: bool = False,
) -> Session:
    """Resolve ``spec`` (see ``llmrun.sources``), then load its tokenizer and weights.

    Device and dtype are checked first, so a bad flag fails before anything is downloaded.
    ``preset:NAME`` (see ``llmrun.presets``) needs ``random_weights``. With ``random_weights`` the
    weights are random, built on the device (a hub repo is fetched without its safetensors), and the
    tokenizer is the model's own when it has a tokenizer.json, else ``ByteTokenizer``.
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if is_preset(spec):
        preset = load_preset(spec)
        if not random_weights:
            raise LlmrunError(
                f"--model {spec} is a preset, a shape without weights: add --random-weights to build it "
                f"with random weights (or use --model {preset.hub_id or 'ORG/NAME'} for the real model)"
            )
        model = random_model(preset.args, torch_device, torch_dtype)
        tokenizer = ByteTokenizer(preset.args.vocab_size)
        return Session(model, tokenizer, preset.path, spec, torch_device, torch_dtype)
    if random_weights:
        model_dir = resolve_model(spec, revision=revision, weights=False)
        model = random_model(ModelArgs.from_json(model_dir / "config.json"), torch_device, torch_dtype)
        has_tokenizer = (model_dir / "tokenizer.json").is_file()
        tokenizer = Tokenizer.from_dir(model_dir) if has_tokenizer else ByteTokenizer(model.args.vocab_size)
        return Session(model, tokenizer, model_dir, spec or DEFAULT_MODEL, torch_device, torch_dtype)
    model_dir = resolve_model(spec, revision=revision)
    ModelArgs.from_json(model_dir / "config.json")  # an unsupported architecture is the first thing to say
    tokenizer = Tokenizer.from_dir(model_dir)
    model = load_model(model_dir, torch_device, torch_dtype)
    return Session(model, tokenizer, model_dir, spec or DEFAULT_MODEL, torch_device, torch_dtype)
