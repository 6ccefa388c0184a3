"""A loaded model with its tokenizer, device and dtype: what every command that runs a model needs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from llmrun.devices import DTYPE_NAMES, resolve_device, resolve_dtype
from llmrun.errors import LlmrunError
from llmrun.generation.byte_tokenizer import ByteTokenizer
from llmrun.loading.loader import load_model, quantize_loaded, read_model_args
from llmrun.loading.native_kernels import native_wanted
from llmrun.loading.presets import is_preset, load_preset, random_model
from llmrun.loading.sources import DEFAULT_MODEL, resolve_model
from llmrun.model.attention import forced_prefill_attention
from llmrun.model.fastpath.gemv import cpu_gemv
from llmrun.model.quant import parse_quant
from llmrun.model.transformer import Transformer

if TYPE_CHECKING:
    from llmrun.generation.tokenizer import Tokenizer
    from llmrun.model.parallel import Collectives


@dataclass
class Session:
    """The model (on ``device`` in ``dtype``), its tokenizer (None when not asked for), and its source."""

    model: Transformer
    tokenizer: Tokenizer | ByteTokenizer | None
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
    with_tokenizer: bool = True,
    parallel: Collectives | None = None,
    quant: str | None = None,
) -> Session:
    """Resolve ``spec`` (see ``llmrun.loading.sources``), then load its tokenizer and weights.

    Device and dtype are checked first, so a bad flag fails before anything is downloaded, and the
    config and tokenizer before the weights. ``preset:NAME`` (see ``llmrun.loading.presets``) needs
    ``random_weights``. With ``random_weights`` the weights are random, built on the device (a hub
    repo is fetched without its safetensors), and the tokenizer is the model's own when it has a
    tokenizer.json, else ``ByteTokenizer``. ``with_tokenizer=False`` skips the tokenizer (and its
    imports), for commands that feed token ids, such as ``profile``. With ``parallel`` (a joined
    tensor-parallel group) the model is this rank's shard (``llmrun.loading.shards``).

    ``quant`` (``llmrun.model.quant.parse_quant``; checked first): ``auto`` or None keeps the
    checkpoint's form (a GGUF's Q4/Q8 matrices stay quantized), ``none`` makes every weight float,
    ``int8``/``int4[:GROUP]`` quantizes them at load.
    """
    quant_spec = parse_quant(quant)
    if parallel is not None and quant_spec.kind not in ("auto", "none"):
        raise LlmrunError("--quant int8/int4 does not run tensor-parallel yet: use --quant none")
    native = quant_spec.kind == "auto" and parallel is None
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if torch_device.type == "cpu":
        cpu_gemv(torch_dtype)  # a bad LLMRUN_CPU_GEMV fails here, before any download or output
    forced_prefill_attention()  # and a bad LLMRUN_PREFILL_ATTENTION
    native_wanted()  # and a bad LLMRUN_NATIVE
    if is_preset(spec):
        preset = load_preset(spec)
        if not random_weights:
            raise LlmrunError(
                f"--model {spec} is a preset, a shape without weights: add --random-weights to build it "
                f"with random weights (or use --model {preset.hub_id or 'ORG/NAME'} for the real model)"
            )
        model_dir, args = preset.path, preset.args
    else:
        model_dir = resolve_model(spec, revision=revision, weights=not random_weights, quantized=native)
        args = read_model_args(model_dir / "config.json")  # an unsupported architecture is said first
    tokenizer = _open_tokenizer(model_dir, args.vocab_size, random_weights) if with_tokenizer else None
    if parallel is not None:
        model = _open_shard(model_dir, args, torch_device, torch_dtype, parallel, random_weights)
    elif random_weights:
        model = random_model(args, torch_device, torch_dtype)
        if quant_spec.kind in ("int8", "int4"):
            quantize_loaded(model, quant_spec)
    else:
        model = load_model(model_dir, torch_device, torch_dtype, quant=None if native else quant_spec)
    return Session(model, tokenizer, model_dir, spec or DEFAULT_MODEL, torch_device, torch_dtype)


def _open_shard(model_dir, args, device, dtype, parallel: Collectives, random_weights: bool) -> Transformer:
    """This rank's shard of the model: random weights or its slices of the checkpoint."""
    from llmrun.loading.shards import load_shard, random_shard

    if random_weights:
        return random_shard(args, device, dtype, parallel)
    return load_shard(model_dir, device, dtype, parallel)


def _open_tokenizer(model_dir: Path, vocab_size: int, random_weights: bool) -> Tokenizer | ByteTokenizer:
    """The model's tokenizer; random-weight models without one get UTF-8 bytes as ids."""
    if random_weights and not (model_dir / "tokenizer.json").is_file():
        return ByteTokenizer(vocab_size)
    from llmrun.generation.tokenizer import Tokenizer

    return Tokenizer.from_dir(model_dir)
