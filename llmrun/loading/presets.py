"""Presets: the real shapes of widely used models, built with random weights for profiling.

``configs/models/NAME.json`` is a Hugging Face ``config.json`` (the fields llmrun reads) plus an
``_llmrun_preset`` object citing where the numbers come from. ``--model preset:NAME
--random-weights`` builds that architecture directly on the device, in the chosen dtype, with
weights drawn from N(0, 0.02^2) (norm scales 1): never all-zero, because zeros make some kernels
faster than real weights would, and never a CPU copy first. On the CPU, where drawing 10^9 normal
samples takes ~10 s on two cores, a large tensor repeats a block of ``CPU_BLOCK`` fresh samples
(a prime count, so rows of any power-of-two width never repeat exactly); the bytes read per token,
and so the speed, are those of fully random weights.

There is no tokenizer for a preset: sessions give it ``llmrun.generation.byte_tokenizer``'s. Random
weights give random tokens; what matters is their count and speed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmrun.devices import DTYPE_NAMES, check_fits
from llmrun.errors import LlmrunError
from llmrun.jsonfiles import read_json_object
from llmrun.model.config import ModelArgs
from llmrun.model.memory import weight_bytes
from llmrun.model.transformer import Transformer, fuse_projections
from llmrun.paths import configs_dir

PRESET_PREFIX = "preset:"
WEIGHT_STD = 0.02  # transformers' default initializer_range for Llama-family configs
CPU_BLOCK = 1_000_003  # samples drawn per CPU tensor; larger tensors repeat them
_META_KEY = "_llmrun_preset"


def presets_dir() -> Path:
    """``$LLMRUN_PRESETS_DIR``, else ``configs/models`` shipped with the package."""
    env = os.environ.get("LLMRUN_PRESETS_DIR")
    return Path(env) if env else configs_dir() / "models"


def preset_names() -> list[str]:
    """Names of the available presets (file names without ``.json``), sorted."""
    return sorted(p.stem for p in presets_dir().glob("*.json"))


def is_preset(spec: str | None) -> bool:
    """Whether a ``--model`` value names a preset (``preset:NAME``)."""
    return spec is not None and spec.startswith(PRESET_PREFIX)


@dataclass(frozen=True)
class Preset:
    """A preset's shapes, where they come from (``source``, a URL), and its file."""

    name: str
    args: ModelArgs
    hub_id: str
    source: str
    notes: str
    path: Path


def load_preset(spec: str) -> Preset:
    """The preset named by ``preset:NAME`` (or bare ``NAME``); an unknown name lists the known ones."""
    name = spec.removeprefix(PRESET_PREFIX)
    path = presets_dir() / f"{name}.json"
    if not name or "/" in name or not path.is_file():
        known = ", ".join(preset_names()) or f"none: {presets_dir()} has no presets"
        raise LlmrunError(f"unknown preset {name!r}; available presets: {known}")
    raw = read_json_object(path, fix="fix the preset file")
    meta = raw.get(_META_KEY) or {}
    if not meta.get("source"):
        raise LlmrunError(f"{path} does not cite its source ({_META_KEY}.source)")
    args = ModelArgs.from_dict(raw, source=str(path))
    return Preset(name, args, meta.get("hub_id", ""), meta["source"], meta.get("notes", ""), path)


def random_model(
    args: ModelArgs, device: torch.device, dtype: torch.dtype, *, seed: int = 0, std: float = WEIGHT_STD
) -> Transformer:
    """``Transformer(args)`` with random weights allocated directly on ``device`` in ``dtype``.

    Built on the meta device like ``llmrun.loading.loader.load_model`` (q/k/v and gate/up fused into one
    matrix each), then each parameter is created with ``torch.empty`` on the target and filled in
    place: N(0, std^2) for matrices and biases, 1 for norm scales. Peak memory is the model
    itself; nothing passes through the CPU on a GPU run. ``seed`` makes it repeatable.
    """
    check_fits(weight_bytes(args, dtype), device, f"random weights in {DTYPE_NAMES[dtype]}")
    with torch.device("meta"):
        model = Transformer(args)
    fused = fuse_projections(model, device, dtype)  # name -> view of a fused matrix, filled in place
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in list(model.named_parameters()):
        tensor = fused.get(name)
        if tensor is None:
            tensor = torch.empty(param.shape, device=device, dtype=dtype)
            module_path, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(module_path), leaf, nn.Parameter(tensor, requires_grad=False))
        if name.endswith("norm.weight"):
            tensor.fill_(1.0)
        else:
            _fill_normal(tensor, std, generator)
    model.tie_weights()
    return model.eval()


def _fill_normal(tensor: torch.Tensor, std: float, generator: torch.Generator) -> None:
    """Fill ``tensor`` in place with N(0, std^2) samples (tiled from a fresh block on the CPU)."""
    flat = tensor.view(-1)
    n = flat.numel()
    if tensor.device.type != "cpu" or n <= CPU_BLOCK:
        flat.normal_(0.0, std, generator=generator)
        return
    block = torch.empty(CPU_BLOCK, dtype=tensor.dtype).normal_(0.0, std, generator=generator)
    whole = n // CPU_BLOCK * CPU_BLOCK
    flat[:whole].view(-1, CPU_BLOCK).copy_(block.expand(n // CPU_BLOCK, CPU_BLOCK))
    flat[whole:].copy_(block[: n - whole])
