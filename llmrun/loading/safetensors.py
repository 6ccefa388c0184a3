"""Read and write safetensors checkpoints: validated, memory-mapped, never unpickled.

The safetensors format is an 8-byte little-endian header length N, N bytes of JSON mapping
tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the
end of the header), then the raw data. Every header is checked (dtype known, offsets inside the
file, no overlap, byte count = numel x element size) before any tensor is created, and tensors
are zero-copy views of a private memory map of the file. The writer streams: it takes one tensor
at a time (``write_safetensors``).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from llmrun.errors import LlmrunError
from llmrun.jsonfiles import read_json_object

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# torch dtype -> the safetensors dtype tag written for it.
SAFETENSORS_TAGS: dict[torch.dtype, str] = {dtype: tag for tag, dtype in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024
INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its file, dtype, shape and byte range in that file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and validate one safetensors header; returns name -> entry (absolute file offsets)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise LlmrunError(f"{path} is truncated ({size} bytes): re-download the weights")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise LlmrunError(
                    f"{path} is corrupt: its header claims {header_len} bytes but the file has {size}; "
                    "re-download the weights"
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise LlmrunError(f"cannot read {path}: {exc.strerror}") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LlmrunError(f"{path} is corrupt: its header is not JSON; re-download the weights") from None
    if not isinstance(header, dict):
        raise LlmrunError(f"{path} is corrupt: its header is not a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    entries = {name: _entry(path, name, spec, data_start, size) for name, spec in header.items()}
    _check_no_overlap(path, entries)
    return entries


def _entry(path: Path, name: str, spec: object, data_start: int, size: int) -> TensorEntry:
    if not isinstance(spec, dict) or not {"dtype", "shape", "data_offsets"} <= spec.keys():
        raise LlmrunError(f"{path} is corrupt: tensor {name!r} lacks dtype/shape/data_offsets")
    dtype = SAFETENSORS_DTYPES.get(spec["dtype"])
    if dtype is None:
        raise LlmrunError(
            f"{path}: tensor {name!r} has unsupported dtype {spec['dtype']!r} "
            f"(supported: {', '.join(SAFETENSORS_DTYPES)})"
        )
    shape, offsets = spec["shape"], spec["data_offsets"]
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise LlmrunError(f"{path} is corrupt: tensor {name!r} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise LlmrunError(f"{path} is corrupt: tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = data_start + offsets[0], data_start + offsets[1]
    expected = math.prod(shape) * dtype.itemsize
    if not (data_start <= begin <= end <= size) or end - begin != expected:
        raise LlmrunError(
            f"{path} is corrupt or truncated: tensor {name!r} needs bytes {offsets[0]}..{offsets[1]} "
            f"({expected} expected) but the data section has {size - data_start}; re-download the weights"
        )
    return TensorEntry(path, dtype, tuple(shape), begin, end)


def _check_no_overlap(path: Path, entries: dict[str, TensorEntry]) -> None:
    spans = sorted((e.begin, e.end, name) for name, e in entries.items() if e.end > e.begin)
    for (_, end_a, name_a), (begin_b, _, name_b) in zip(spans, spans[1:], strict=False):
        if begin_b < end_a:
            raise LlmrunError(f"{path} is corrupt: tensors {name_a!r} and {name_b!r} overlap")


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory: those named by the shard index, or all of them.

    Pickle-based weights (``*.bin``, ``*.pt``) are refused: they can run code when loaded.
    """
    index = model_dir / INDEX_NAME
    if index.exists():
        return _files_from_index(model_dir, index)
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    if any(p.suffix in PICKLE_SUFFIXES for p in model_dir.iterdir()):
        raise LlmrunError(
            f"{model_dir} has only pickle weights (.bin/.pt), which llmrun never loads because they can "
            "run code; convert them to safetensors or download the safetensors version"
        )
    raise LlmrunError(f"{model_dir} has no *.safetensors weights")


def shard_names(index: Path) -> list[str]:
    """The shard file names the ``weight_map`` of a shard index names, sorted, each once."""
    fix = "re-download the model (expected JSON with a 'weight_map' object)"
    weight_map = read_json_object(index, fix=fix).get("weight_map")
    if not isinstance(weight_map, dict):
        raise LlmrunError(f"{index} is corrupt: expected JSON with a 'weight_map' object")
    names = set(weight_map.values())
    for name in names:
        if not isinstance(name, str):
            raise LlmrunError(f"{index} is corrupt: shard name {name!r} is not a string")
    return sorted(names)


def _files_from_index(model_dir: Path, index: Path) -> list[Path]:
    root = Path(os.path.abspath(model_dir))
    files = []
    for name in shard_names(index):
        # A lexical check, not a resolved one: in the Hugging Face cache every snapshot file is a
        # symlink into ../../blobs by design; what the index itself may not do is name a path outside.
        shard = Path(os.path.normpath(root / name))
        if not shard.is_relative_to(root):
            raise LlmrunError(f"{index} names {name!r}, a path outside the model directory; refusing it")
        if not shard.is_file():
            raise LlmrunError(f"{index} names shard {name!r}, which is missing; re-download the model")
        files.append(shard)
    return files


def read_index(files: list[Path]) -> dict[str, TensorEntry]:
    """Headers of all files merged into one name -> entry map (a duplicated name is an error)."""
    entries: dict[str, TensorEntry] = {}
    for path in files:
        for name, entry in read_header(path).items():
            if name in entries:
                raise LlmrunError(f"tensor {name!r} appears in both {entries[name].file} and {path}")
            entries[name] = entry
    return entries


class MappedFiles:
    """Private (copy-on-write) memory maps of checkpoint files, opened on demand."""

    def __init__(self) -> None:
        self._maps: dict[Path, mmap.mmap] = {}

    def tensor(self, entry: TensorEntry) -> torch.Tensor:
        """A CPU tensor viewing the mapped bytes of ``entry`` (no copy unless misaligned)."""
        mm = self._maps.get(entry.file)
        if mm is None:
            with entry.file.open("rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps[entry.file] = mm
        count = math.prod(entry.shape)
        if count == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        if entry.begin % entry.dtype.itemsize:
            raw = torch.frombuffer(mm, dtype=torch.uint8, count=entry.end - entry.begin, offset=entry.begin)
            return raw.clone().view(entry.dtype).reshape(entry.shape)
        flat = torch.frombuffer(mm, dtype=entry.dtype, count=count, offset=entry.begin)
        return flat.reshape(entry.shape)

    def release(self, entry: TensorEntry) -> None:
        """Drop the pages of ``entry`` from this process once its bytes were copied elsewhere.

        The mapping is private and never written, so a page dropped here that a neighbouring tensor
        still uses is read back from the page cache on its next access: nothing is lost, and copying a
        tensor out of the map does not leave a second resident copy behind.
        """
        mm = self._maps.get(entry.file)
        if mm is None or entry.end <= entry.begin:
            return
        begin = entry.begin - entry.begin % mmap.PAGESIZE
        mm.madvise(mmap.MADV_DONTNEED, begin, entry.end - begin)

    def iter_tensors(self, entries: dict[str, TensorEntry]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) in file order, so reads sweep each file once."""
        for name, entry in sorted(entries.items(), key=lambda kv: (str(kv[1].file), kv[1].begin)):
            yield name, self.tensor(entry)


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: its name, shape (elements per dimension) and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


def write_safetensors(
    path: Path, specs: Sequence[TensorSpec], tensors: Iterable[torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write one safetensors file, holding one tensor in memory at a time.

    The header is laid out from ``specs`` first (every offset follows from the shapes and dtypes),
    then the tensors are taken from ``tensors`` one by one, in ``specs`` order, and each is written
    and dropped before the next is asked for. That is why this writer exists beside
    ``safetensors.torch.save_file``, which needs every tensor in memory at once: a dequantized model
    can be larger than the memory left. The JSON header is space-padded to 8 bytes, as the format's
    reference writer pads it, so that every tensor's data starts aligned.

    Args:
        path: the file to create (replaced if it exists).
        specs: name, shape and dtype of each tensor, in file order; dtypes from ``SAFETENSORS_TAGS``.
        tensors: the CPU tensors themselves, in the same order, each matching its spec.
        metadata: string key/values stored under ``__metadata__`` (default ``{"format": "pt"}``).

    Raises:
        ValueError: a tensor does not match its spec, or ``tensors`` yields more or fewer than ``specs``.
    """
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for spec in specs:
        nbytes = math.prod(spec.shape) * spec.dtype.itemsize
        entry = {
            "dtype": SAFETENSORS_TAGS[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        header[spec.name] = entry
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for spec, tensor in zip(specs, tensors, strict=True):
            if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
                raise ValueError(
                    f"tensor {spec.name!r} is {tuple(tensor.shape)} {tensor.dtype}, but its header says "
                    f"{spec.shape} {spec.dtype}"
                )
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
