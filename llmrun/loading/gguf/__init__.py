"""Import a llama.cpp GGUF file (architecture ``llama``) into a Hugging Face-layout directory.

The output directory holds ``config.json``, ``model.safetensors`` (every tensor dequantized to one float
dtype, or, with ``quantized``, the Q4_0/Q4_1/Q4_K/Q8_0 matrices kept quantized), ``tokenizer.json``,
``tokenizer_config.json`` and ``generation_config.json``, so the rest of llmrun (and, for a float
import, Hugging Face transformers) sees one format, and a marker, ``.llmrun-import.json``, naming
the file it was imported from: only a directory carrying it (or an empty one) is ever replaced.

A quantized import stores each such matrix ``P.weight`` as three tensors, never in a device's packed
layout (``llmrun.model.quant.weight``, ``llmrun.loading.gguf.tensors``): ``P.weight`` the codes
(int8 (N, K) for Q8_0; uint8 (N, K/2) for the 4-bit types, two codes 0..15 per byte, column 2j in
the high nibble), ``P.weight_scale`` float32 (N, K/32) and, 4-bit only, ``P.weight_zero`` float32
(N, K/32); w = code · scale, or (code - 8) · scale + zero. Its marker says so (``"weights"``), so
a float import is never taken for a quantized one, nor the reverse. Hugging Face transformers
cannot read a quantized import; a float one (the default of ``import_gguf``) is what it compares with.

The parts: ``metadata`` (opening the file, typed metadata, the architecture check), ``config``
(config.json, rope scaling), ``tensors`` (names, dequantization, the rotary permutation undone) and
``tokenizer`` (tokenizer and generation config files); this module runs them and owns the output
directory.

References followed:
- llama.cpp ``convert_hf_to_gguf.py`` (``LlamaModel``): tensor names, the rotary row permutation of
  ``q_proj``/``k_proj`` undone here, and the ``rope_freqs`` tensor written for Llama 3 rope scaling.
- llama.cpp ``src/llama-vocab.cpp``: which pre-tokenizer regexes each ``tokenizer.ggml.pre`` value means.
- gguf-py (``GGUFReader``, ``gguf.quants.dequantize``) and the safetensors file format spec.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from llmrun.devices import DTYPES
from llmrun.errors import LlmrunError
from llmrun.jsonfiles import read_json_object, write_json_atomic
from llmrun.loading.gguf.config import build_config
from llmrun.loading.gguf.metadata import Metadata, check_architecture, check_gguf_file, open_reader
from llmrun.loading.gguf.tensors import (
    TensorJob,
    check_quant_types,
    keeps_quantized,
    load_quantized,
    load_tensor,
    plan_tensors,
)
from llmrun.loading.gguf.tokenizer import build_tokenizer, generation_config, tokenizer_config
from llmrun.loading.safetensors import TensorSpec, write_safetensors

MARKER = ".llmrun-import.json"
QUANTIZED_WEIGHTS = "gguf-quantized-1"  # the marker's "weights" for a quantized import (layout version 1)
FLOAT_TYPES = frozenset({"F32", "F16", "BF16", "F64"})  # GGUF tensor types that hold floats, not codes


def import_gguf(
    gguf_path: Path,
    out_dir: Path,
    dtype: str = "float32",
    *,
    overwrite: bool = False,
    progress: bool = True,
    source: dict[str, Any] | None = None,
    quantized: bool = False,
) -> Path:
    """Import a llama.cpp GGUF file (architecture ``llama``) into a Hugging Face-layout directory.

    Every tensor is dequantized (F32/F16/BF16, Q4_0..Q8_0, K-quants, whatever ``gguf.quants``
    supports) to ``dtype``, the llama.cpp rotary row permutation of ``q_proj``/``k_proj`` is undone,
    and the tokenizer is rebuilt from the GGUF vocabulary. Everything is written into a temporary
    directory next to ``out_dir`` and renamed into place at the end, so an error or Ctrl-C leaves
    ``out_dir`` as it was.

    Args:
        gguf_path: the ``.gguf`` file.
        out_dir: the directory to create. It may exist only as an empty directory, or, with
            ``overwrite``, as an earlier import (one carrying the ``MARKER`` file); anything else
            there is refused and left untouched.
        dtype: float dtype of the written weights: a name of ``llmrun.devices.DTYPES`` (fp32,
            bf16, fp16, float32, bfloat16, float16, ...).
        overwrite: replace an earlier import at ``out_dir``.
        progress: show a progress bar over tensors on stderr.
        source: the identity recorded in the marker; default ``gguf_identity(gguf_path)``.
        quantized: keep Q4_0, Q4_1, Q4_K and Q8_0 matrices quantized (other types are dequantized
            to ``dtype``, with a note on stderr naming them).

    Returns:
        ``out_dir``.

    Raises:
        LlmrunError: a missing, unreadable or truncated file, not a ``llama`` model, an unsupported
            quantization, rope scaling (YaRN) or tokenizer type, or an occupied ``out_dir``.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    torch_dtype = _resolve_dtype(dtype)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    check_gguf_file(gguf_path)
    _check_out_dir(out_dir, overwrite)
    marker = _marker(source or gguf_identity(gguf_path), dtype_name, quantized)
    reader = open_reader(gguf_path)
    meta = Metadata(reader.fields)
    check_architecture(meta, gguf_path)
    tensors = {t.name: t for t in reader.tensors}
    config = build_config(meta, tensors, dtype_name)
    jobs = plan_tensors(tensors, config)
    check_quant_types(jobs)
    tokenizer = build_tokenizer(meta)
    with _atomic_dir(out_dir, overwrite) as tmp:
        write_json_atomic(tmp / "config.json", config)
        write_json_atomic(tmp / "generation_config.json", generation_config(meta))
        write_json_atomic(tmp / "tokenizer_config.json", tokenizer_config(meta, config))
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_weights(tmp / "model.safetensors", jobs, torch_dtype, progress, quantized)
        write_json_atomic(tmp / MARKER, marker)
    return out_dir


def gguf_identity(path: Path) -> dict[str, Any]:
    """What tells one GGUF file from another: ``{"path": resolved path, "size": bytes, "mtime_ns": ns}``.

    One ``stat``, so it costs nothing on every run, where a hash of the content would read the whole
    file (gigabytes) each time, and a hash of the header alone would not tell apart two files with
    the same metadata and other weights (two fine-tunes of one base at one quantization). Writing a
    file anew (a re-download, another quantization saved under the same name) changes its mtime and
    usually its size: the rule by which Python decides that a ``.pyc`` is stale. Two files at
    different paths never share an identity; one file copied to two paths is imported twice.

    Raises:
        LlmrunError: ``path`` does not exist or is a directory.
    """
    check_gguf_file(path)
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def is_import_of(out_dir: Path, source: dict[str, Any], dtype: str = "float32", *, quantized: bool = False) -> bool:
    """Whether ``out_dir`` holds a complete import of ``source`` (a ``gguf_identity``) at ``dtype``,
    quantized or not."""
    marker = _read_marker(out_dir)
    return marker == _marker(source, dtype, quantized) and (out_dir / "config.json").is_file()


def _marker(source: dict[str, Any], dtype: str, quantized: bool) -> dict[str, Any]:
    """What the marker of an import of ``source`` holds (a float import's marker has no ``weights``)."""
    return {"source": source, "dtype": dtype, **({"weights": QUANTIZED_WEIGHTS} if quantized else {})}


def _read_marker(out_dir: Path) -> dict[str, Any] | None:
    """The marker of an import directory, or None where there is none (or it is not a marker)."""
    try:
        marker = read_json_object(out_dir / MARKER)
    except LlmrunError:
        return None
    return marker if isinstance(marker.get("source"), dict) else None


def _resolve_dtype(dtype: str) -> torch.dtype:
    """The torch dtype for a requested dtype name."""
    torch_dtype = DTYPES.get(dtype.strip().lower())
    if torch_dtype is None:
        raise LlmrunError(f"Unsupported dtype {dtype!r} for a GGUF import; use fp32, bf16 or fp16")
    return torch_dtype


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse an ``out_dir`` that an import may not replace; touch nothing.

    Free: a missing path, or an empty directory. With ``overwrite``: an earlier import (it carries the
    marker). Never: a file, a link, or a directory of anything else.
    """
    if not (out_dir.exists() or out_dir.is_symlink()):
        return
    if out_dir.is_symlink() or not out_dir.is_dir():
        raise LlmrunError(
            f"{out_dir} exists and is a file or a link, not a directory; an import never replaces it, "
            "so choose another output directory"
        )
    if not any(out_dir.iterdir()):
        return
    if _read_marker(out_dir) is None:
        raise LlmrunError(
            f"{out_dir} already exists and is not empty, and it is not a directory llmrun imported into "
            f"(it has no {MARKER}); an import never replaces it, so move it away or choose another directory"
        )
    if not overwrite:
        raise LlmrunError(f"{out_dir} already holds an earlier import; pass --overwrite to replace it")


def _write_weights(path: Path, jobs: list[TensorJob], dtype: torch.dtype, progress: bool, quantized: bool) -> None:
    """Write every tensor into one safetensors file, one tensor in memory at a time: dequantized at
    ``dtype``, or (``quantized``) in its stored quantized form where ``keeps_quantized``."""
    kept = {job.hf_name for job in jobs if quantized and keeps_quantized(job)}
    specs = [spec for job in jobs for spec in _specs(job, dtype, job.hf_name in kept)]
    if quantized:
        _note_dequantized(jobs, kept)
    with _progress_bar(progress, len(jobs)) as advance:
        write_safetensors(path, specs, _converted(jobs, dtype, kept, advance))


def _specs(job: TensorJob, dtype: torch.dtype, kept: bool) -> list[TensorSpec]:
    """The checkpoint tensors one job writes: one float tensor, or codes, scales (and zeros)."""
    if not kept:
        return [TensorSpec(job.hf_name, job.shape, dtype)]
    n, k = job.shape
    eight_bit = job.source.tensor_type.name == "Q8_0"
    codes = TensorSpec(job.hf_name, (n, k if eight_bit else k // 2), torch.int8 if eight_bit else torch.uint8)
    groups = (n, k // 32)
    extra = ["_scale"] if eight_bit else ["_scale", "_zero"]
    return [codes, *(TensorSpec(job.hf_name + suffix, groups, torch.float32) for suffix in extra)]


def _note_dequantized(jobs: list[TensorJob], kept: set[str]) -> None:
    """Say on stderr which matrices of other quantized types are dequantized in a quantized import
    (float matrices, F32/F16/BF16, are simply converted)."""
    types = {job.source.tensor_type.name for job in jobs if len(job.shape) == 2 and job.hf_name not in kept}
    other = sorted(types - FLOAT_TYPES)
    if other:
        Console(stderr=True).print(
            f"note: {', '.join(other)} matrices are dequantized (llmrun runs Q4_0, Q4_1, Q4_K and Q8_0 quantized)",
            highlight=False,
        )


def _converted(
    jobs: list[TensorJob], dtype: torch.dtype, kept: set[str], advance: Callable[[], None]
) -> Iterator[torch.Tensor]:
    """Each job's tensors in HF layout (``_specs`` order), loaded only when asked for; ``advance`` after each job."""
    for job in jobs:
        if job.hf_name in kept:
            yield from (torch.from_numpy(a) for a in load_quantized(job).values())
        else:
            yield torch.from_numpy(np.require(load_tensor(job), requirements=["C", "W"])).to(dtype)
        advance()


@contextmanager
def _progress_bar(enabled: bool, total: int) -> Iterator[Callable[[], None]]:
    """A rich progress bar over ``total`` tensors on stderr; yields a no-argument ``advance`` callable.

    Off when stderr is not a terminal: logs and pipes get no bar lines before a result or an error.
    """
    console = Console(stderr=True)
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tensors"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, disable=not (enabled and console.is_terminal)) as bar:
        task = bar.add_task("Importing GGUF", total=total)
        yield lambda: bar.advance(task)


@contextmanager
def _atomic_dir(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory next to ``out_dir``; on success rename it to ``out_dir``.

    On any exception (KeyboardInterrupt included) the temporary directory is removed and ``out_dir`` is
    left as it was. What is at ``out_dir`` is checked again just before the rename (the import may have
    taken minutes); an existing ``out_dir`` (empty, or an earlier import under ``overwrite``) is moved
    aside and then removed.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex[:8]}.importing"
    tmp.mkdir()
    try:
        yield tmp
        _check_out_dir(out_dir, overwrite)
        if out_dir.exists():
            _swap_in(tmp, out_dir)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(new: Path, out_dir: Path) -> None:
    """Replace the existing directory ``out_dir`` by ``new``; put it back if that fails."""
    old = new.with_suffix(".old")
    os.replace(out_dir, old)
    try:
        os.replace(new, out_dir)
    except BaseException:
        os.replace(old, out_dir)
        raise
    shutil.rmtree(old)
