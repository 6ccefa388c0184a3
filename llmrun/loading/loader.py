"""Build a ``Transformer`` from a Hugging Face-layout directory without a second copy of the weights.

The model is built on the ``meta`` device (no memory), every checkpoint tensor is validated
against the shapes the config implies before anything is allocated, then each tensor is viewed
from a memory map of its file and moved/cast to the target device and dtype. On the CPU in the
checkpoint's own dtype that is zero-copy: the parameters are the mapped pages. The q/k/v and
gate/up projections are the exception: they are copied into one fused matrix per block
(``llmrun.model.transformer.fuse_projections``), and their mapped pages are released after the copy, so the
resident total stays one copy of the weights.

A quantized checkpoint (``P.weight`` integer codes beside ``P.weight_scale`` and, 4-bit, ``P.weight_zero``:
the layout of ``llmrun.model.quant.weight``) loads its matrices as ``QuantWeight``s, each kernel's
packed form made on the device at load; ``quant`` asks for another format instead (``none``
dequantizes every matrix as it loads; ``int8``/``int4`` quantize a float model after loading it).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from llmrun.allocator import return_freed_memory
from llmrun.devices import DTYPE_NAMES, check_fits, oom_guard
from llmrun.errors import LlmrunError
from llmrun.jsonfiles import read_json_object
from llmrun.loading.native_kernels import native_kernels
from llmrun.loading.safetensors import MappedFiles, TensorEntry, checkpoint_files, read_index
from llmrun.model.config import ModelArgs
from llmrun.model.memory import weight_bytes
from llmrun.model.quant import QuantEmbedding, QuantLinear, QuantSpec, QuantWeight, prepare_model, quantize_model
from llmrun.model.transformer import Transformer, fuse_projections

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def read_model_args(path: Path) -> ModelArgs:
    """``ModelArgs`` from a ``config.json``; a missing, empty or invalid file is a user error."""
    raw = read_json_object(path, missing="a model directory needs a config.json", fix="re-download or fix the file")
    return ModelArgs.from_dict(raw, source=str(path))


def load_model(
    model_dir: Path, device: torch.device, dtype: torch.dtype, *, progress: bool = True, quant: QuantSpec | None = None
) -> Transformer:
    """Load config and safetensors weights of ``model_dir`` onto ``device`` in ``dtype``.

    ``quant`` None keeps the checkpoint's own form (quantized or float); a ``QuantSpec`` makes every
    matrix that format (``none``: float). Running out of memory is an ``LlmrunError`` that gives the
    bytes needed and free. On the CPU, llmrun's native kernels are bound first (built once where a C
    compiler is), so that they join every kernel choice made for the model.
    """
    if device.type == "cpu":
        native_kernels()
    with oom_guard(device, "loading the weights"):
        entries = read_index(checkpoint_files(model_dir))
        groups = quantized_groups(entries)
        if groups:
            model = _load_quantized(model_dir, entries, groups, device, dtype, progress, native=quant is None)
        else:
            model = _load(model_dir, entries, device, dtype, progress)
        if quant is not None and quant.kind != "none":
            quantize_loaded(model, quant, progress)
        if groups or quant is not None:
            return_freed_memory()
        return model


def quantize_loaded(model: Transformer, quant: QuantSpec, progress: bool = True) -> None:
    """Quantize a loaded float model's matrices to ``quant`` in place, with a progress bar on a terminal."""
    total = sum(p.nbytes for p in model.parameters())
    with _progress_bar(progress and total > 64 * 2**20) as bar:
        task = bar.add_task(f"quantizing to {quant.name}", total=total)
        quantize_model(model, quant, lambda n: bar.advance(task, n))
    native_kernels()  # llmrun's own kernels join the candidates where they build (else PyTorch's serve)
    prepare_model(model)


def _load(
    model_dir: Path, entries: dict[str, TensorEntry], device: torch.device, dtype: torch.dtype, progress: bool
) -> Transformer:
    args = read_model_args(model_dir / "config.json")
    check_fits(weight_bytes(args, dtype), device, f"the weights of {model_dir.name} in {DTYPE_NAMES[dtype]}")
    with torch.device("meta"):
        model = Transformer(args)
    entries = _validated(model, entries)
    fused = fuse_projections(model, device, dtype)  # q/k/v and gate/up are copied into one matrix each
    mapped = MappedFiles()
    total = sum(e.end - e.begin for e in entries.values())
    with _progress_bar(progress and total > 64 * 2**20) as bar:
        task = bar.add_task(f"loading {model_dir.name}", total=total)
        for name, tensor in mapped.iter_tensors(entries):
            target = fused.get(name)
            if target is None:
                _assign(model, name, tensor.to(device=device, dtype=dtype))
            else:
                target.copy_(tensor)
                mapped.release(entries[name])
            bar.advance(task, tensor.nbytes)
    model.tie_weights()
    return model.eval()


def _validated(
    model: Transformer, entries: dict[str, TensorEntry], quantized: dict[str, tuple[int, int]] | None = None
) -> dict[str, TensorEntry]:
    """Drop tensors the model ignores; refuse missing, unexpected, misshapen or non-float ones.

    ``quantized`` maps the names of the matrices stored quantized (not in ``entries``) to their shapes.
    """
    expected = model.expected_tensors()
    for name, shape in (quantized or {}).items():
        if name not in expected or tuple(expected.pop(name)) != shape:
            raise LlmrunError(f"quantized tensor {name!r} has no place of shape {list(shape)} in this config.json")
    entries = {n: e for n, e in entries.items() if not model.ignores_tensor(n)}
    missing = sorted(expected.keys() - entries.keys())
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise LlmrunError(f"checkpoint is missing tensor {missing[0]!r}{more}; the weights do not match config.json")
    extra = sorted(entries.keys() - expected.keys())
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise LlmrunError(
            f"checkpoint has unexpected tensor {extra[0]!r}{more} ({entries[extra[0]].file.name}); "
            "the weights do not match config.json"
        )
    for name, entry in entries.items():
        if tuple(expected[name]) != entry.shape:
            raise LlmrunError(
                f"tensor {name!r} in {entry.file.name} has shape {list(entry.shape)} but config.json implies "
                f"{list(expected[name])}"
            )
        if entry.dtype not in FLOAT_DTYPES:
            raise LlmrunError(f"tensor {name!r} in {entry.file.name} has dtype {entry.dtype}; weights must be float")
    return entries


def quantized_groups(entries: dict[str, TensorEntry]) -> dict[str, dict[str, TensorEntry]]:
    """The quantized matrices of a checkpoint: name -> {``""``: codes, ``"_scale"``, ``"_zero"``} entries."""
    return {
        name.removesuffix("_scale"): {
            suffix: entries[name.removesuffix("_scale") + suffix]
            for suffix in ("", "_scale", "_zero")
            if name.removesuffix("_scale") + suffix in entries
        }
        for name in entries
        if name.endswith(".weight_scale")
    }


def stored_formats(model_dir: Path) -> dict[str, str]:
    """Checkpoint name -> format (``QuantWeight.format``: ``int8``, ``int8:G``, ``int4:G``) of every matrix
    ``model_dir`` stores quantized, from the safetensors headers alone ({} for a float or weightless directory).

    Raises:
        LlmrunError: a header that is not safetensors, or scales that do not match their codes.
    """
    if not any(model_dir.glob("*.safetensors")):
        return {}
    formats = {}
    for name, group in quantized_groups(read_index(checkpoint_files(model_dir))).items():
        if "" not in group:
            raise LlmrunError(f"quantized tensor {name!r} has scales but no codes; the checkpoint is corrupt")
        meta = [torch.empty(e.shape, dtype=e.dtype, device="meta") for e in group.values()]  # codes, scales[, zeros]
        formats[name] = QuantWeight(*meta, name=name).format
    return formats


def _load_quantized(
    model_dir: Path,
    entries: dict[str, TensorEntry],
    groups: dict[str, dict[str, TensorEntry]],
    device: torch.device,
    dtype: torch.dtype,
    progress: bool,
    *,
    native: bool,
) -> Transformer:
    """Load a quantized checkpoint: its matrices as ``QuantWeight``s (``native``) or dequantized to ``dtype``."""
    args = read_model_args(model_dir / "config.json")
    mapped = MappedFiles()
    weights = {name: _quant_weight(name, group, mapped, device, dtype) for name, group in groups.items()}
    stored = sum(w.nbytes for w in weights.values()) if native else 0
    stored_entries = {name + suffix: entry for name, group in groups.items() for suffix, entry in group.items()}
    floats = {n: e for n, e in entries.items() if n not in stored_entries}
    with torch.device("meta"):
        model = Transformer(args)
    floats = _validated(model, floats, {name: w.shape for name, w in weights.items()})
    float_bytes = sum(math.prod(e.shape) for e in floats.values()) * dtype.itemsize
    needed = stored + float_bytes + (0 if native else weight_bytes(args, dtype))
    check_fits(needed, device, f"the weights of {model_dir.name}")
    with _progress_bar(progress and stored + float_bytes > 64 * 2**20) as bar:
        task = bar.add_task(f"loading {model_dir.name}", total=len(weights) + len(floats))
        for name, weight in weights.items():
            _install(model, name, weight if native else weight.dequantize(dtype).to(device))
            bar.advance(task)
        for name, tensor in mapped.iter_tensors(floats):
            _assign(model, name, tensor.to(device=device, dtype=dtype))
            bar.advance(task)
    model.tie_weights()
    fuse_projections(model)
    _release(mapped, stored_entries)  # q/k/v and gate/up are copied into fused matrices
    if native:  # a weight's mapped pages are dropped whenever a kernel's own form replaces a stored tensor
        for name, weight in weights.items():
            weight.release_mapped = functools.partial(_release, mapped, groups[name])
        prepare_model(model, lambda weight: return_freed_memory())  # the packing's scratch, any codes dropped
    return model.eval()


def _release(mapped: MappedFiles, entries: dict[str, TensorEntry]) -> None:
    """Drop the mapped pages of ``entries`` from memory (read back from the file if used again)."""
    for entry in entries.values():
        mapped.release(entry)


def _quant_weight(
    name: str, group: dict[str, TensorEntry], mapped: MappedFiles, device: torch.device, dtype: torch.dtype
) -> QuantWeight:
    """One stored quantized matrix as a ``QuantWeight`` on ``device`` (checked: ``LlmrunError`` if it is not one)."""
    tensors = {suffix: mapped.tensor(entry) for suffix, entry in group.items()}
    weight = QuantWeight(tensors[""], tensors["_scale"], tensors.get("_zero"), dtype=dtype, name=name)
    return weight.to(device)


def _install(model: Transformer, name: str, weight: QuantWeight | torch.Tensor) -> None:
    """Put a loaded matrix at checkpoint name ``name`` (``....weight``): a quantized one replaces its module."""
    if isinstance(weight, torch.Tensor):
        _assign(model, name, weight)
        return
    module_path = name.removesuffix(".weight")
    owner_path, _, leaf = module_path.rpartition(".")
    old = model.get_submodule(module_path)
    module = QuantEmbedding(weight) if isinstance(old, nn.Embedding) else QuantLinear(weight)
    setattr(model.get_submodule(owner_path) if owner_path else model, leaf, module)


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_path, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(module_path), leaf, nn.Parameter(tensor, requires_grad=False))


def _progress_bar(enabled: bool) -> Progress:
    """A transient bar on stderr; off when stderr is not a terminal, where rich would leave a blank line."""
    console = Console(stderr=True)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not (enabled and console.is_terminal),
    )
