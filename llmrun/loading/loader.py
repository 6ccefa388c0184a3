"""Build a ``Transformer`` from a Hugging Face-layout directory without a second copy of the weights.

The model is built on the ``meta`` device (no memory), every checkpoint tensor is validated
against the shapes the config implies before anything is allocated, then each tensor is viewed
from a memory map of its file and moved/cast to the target device and dtype. On the CPU in the
checkpoint's own dtype that is zero-copy: the parameters are the mapped pages. The q/k/v and
gate/up projections are the exception: they are copied into one fused matrix per block
(``llmrun.model.transformer.fuse_projections``), and their mapped pages are released after the copy, so the
resident total stays one copy of the weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from llmrun.devices import DTYPE_NAMES, check_fits, oom_guard
from llmrun.errors import LlmrunError
from llmrun.jsonfiles import read_json_object
from llmrun.loading.safetensors import MappedFiles, TensorEntry, checkpoint_files, read_index
from llmrun.model.config import ModelArgs
from llmrun.model.memory import weight_bytes
from llmrun.model.transformer import Transformer, fuse_projections

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def read_model_args(path: Path) -> ModelArgs:
    """``ModelArgs`` from a ``config.json``; a missing, empty or invalid file is a user error."""
    raw = read_json_object(path, missing="a model directory needs a config.json", fix="re-download or fix the file")
    return ModelArgs.from_dict(raw, source=str(path))


def load_model(model_dir: Path, device: torch.device, dtype: torch.dtype, *, progress: bool = True) -> Transformer:
    """Load config and safetensors weights of ``model_dir`` onto ``device`` in ``dtype``.

    Running out of memory is an ``LlmrunError`` that gives the bytes needed and free.
    """
    with oom_guard(device, "loading the weights"):
        return _load(model_dir, device, dtype, progress)


def _load(model_dir: Path, device: torch.device, dtype: torch.dtype, progress: bool) -> Transformer:
    args = read_model_args(model_dir / "config.json")
    check_fits(weight_bytes(args, dtype), device, f"the weights of {model_dir.name} in {DTYPE_NAMES[dtype]}")
    entries = read_index(checkpoint_files(model_dir))
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


def _validated(model: Transformer, entries: dict[str, TensorEntry]) -> dict[str, TensorEntry]:
    """Drop tensors the model ignores; refuse missing, unexpected, misshapen or non-float ones."""
    expected = model.expected_tensors()
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
