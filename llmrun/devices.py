"""Turn ``--device`` and ``--dtype`` strings into torch objects, or say clearly why not.

Also turns running out of memory (CUDA or host) into an ``LlmrunError`` that gives the numbers.
"""

from __future__ import annotations

import platform
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from llmrun.errors import LlmrunError

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def resolve_device(spec: str) -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if not match:
        raise LlmrunError(f"--device {spec!r} is not a device; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise LlmrunError(f"--device {spec}: no CUDA GPU is available here; use --device cpu")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise LlmrunError(
            f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible (cuda:0.."
            f"cuda:{torch.cuda.device_count() - 1})"
        )
    return torch.device("cuda", index)


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on a GPU that supports it (else fp16), fp32 on the CPU.

    fp32 is the CPU default because it is exact against the reference implementation; bf16 halves
    the bytes and decodes faster on the fast path at bf16's precision (docs/performance.md).
    """
    spec = spec.strip().lower()
    if spec == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if spec not in DTYPES:
        raise LlmrunError(f"--dtype {spec!r} is not supported; use auto, bf16, fp16 or fp32")
    return DTYPES[spec]


def cpu_model_name() -> str:
    """The CPU's model name: ``model name`` of /proc/cpuinfo (Linux), else ``platform.processor()``, else "CPU"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that host timers measure it; no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# PyTorch's allocator messages: "Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB of which
# 1.50 GiB is free." (CUDA caching allocator) and "DefaultCPUAllocator: can't allocate memory: you tried to
# allocate 1099511627776 bytes." (host).
_CUDA_NEEDED = re.compile(r"Tried to allocate ([\d.]+) (B|KiB|MiB|GiB|TiB)")
_CUDA_FREE = re.compile(r"of which ([\d.]+) (B|KiB|MiB|GiB|TiB) is free")
_CPU_OOM = re.compile(r"can't allocate memory: you tried to allocate (\d+) bytes")
_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
OOM_ADVICE = (
    "try --dtype bf16 or fp16 (half the bytes of fp32), a shorter prompt or --max-new-tokens "
    "(the KV cache grows with the context), a smaller batch, or a smaller model"
)


@contextmanager
def oom_guard(device: torch.device | None, doing: str) -> Iterator[None]:
    """Re-raise an out-of-memory error inside the block as ``out_of_memory_error(exc, device, doing)``."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        raise out_of_memory_error(exc, device, doing) from exc
    except RuntimeError as exc:
        if _CPU_OOM.search(str(exc)) is None:
            raise
        raise out_of_memory_error(exc, torch.device("cpu"), doing) from exc


def out_of_memory_error(exc: BaseException, device: torch.device | None, doing: str) -> LlmrunError:
    """A one-line error for an out-of-memory ``exc`` raised while ``doing`` (e.g. "loading the weights").

    It names the bytes the failed allocation needed and the bytes free on the device (CUDA:
    ``torch.cuda.mem_get_info``, else the allocator's message; CPU: ``MemAvailable`` of /proc/meminfo),
    and what to try. ``device`` None means the current CUDA device.
    """
    text = str(exc)
    if not isinstance(exc, torch.OutOfMemoryError):  # the host allocator's RuntimeError
        cpu = _CPU_OOM.search(text)
        needed = int(cpu.group(1)) if cpu is not None else None
        free, total, where = available_memory(), None, "the CPU"
    else:
        gpu = device if device is not None and device.type == "cuda" else None
        needed = _parse_bytes(_CUDA_NEEDED.search(text))
        free, total = _cuda_memory(gpu)
        if free is None:
            free = _parse_bytes(_CUDA_FREE.search(text))
        where = str(gpu) if gpu is not None else "the GPU"
    need = f"needed {format_bytes(needed)}" if needed is not None else "needed more than was free"
    have = "free memory unknown" if free is None else f"{format_bytes(free)} free"
    if free is not None and total is not None:
        have += f" of {format_bytes(total)}"
    return LlmrunError(f"out of memory on {where} while {doing}: {need}, {have}; {OOM_ADVICE}")


def check_fits(nbytes: int, device: torch.device, doing: str) -> None:
    """Refuse, before allocating, ``nbytes`` that ``device`` does not have free (``doing``: what needs them).

    Free is ``MemAvailable`` on the CPU and the driver's free bytes on a GPU; where it cannot be
    known nothing is refused (the allocator's own error still becomes one line, ``oom_guard``).
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, total = _cuda_memory(device)
        where = str(device)
    else:
        free, total, where = available_memory(), None, "the CPU"
    if free is None or nbytes <= free:
        return
    have = f"{format_bytes(free)} free" + (f" of {format_bytes(total)}" if total is not None else "")
    need = f"it needs {format_bytes(nbytes)}"
    raise LlmrunError(f"not enough memory on {where} for {doing}: {need}, {have}; {OOM_ADVICE}")


def format_bytes(n: int) -> str:
    """``n`` bytes as GiB (or MiB below 1 GiB) with two decimals, e.g. ``2.50 GiB``."""
    if n >= 2**40:
        return f"{n / 2**40:.2f} TiB"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _parse_bytes(match: re.Match[str] | None) -> int | None:
    return None if match is None else int(float(match.group(1)) * _UNITS[match.group(2)])


def _cuda_memory(device: torch.device | None) -> tuple[int | None, int | None]:
    """(free, total) bytes of ``device`` from the driver, or (None, None) where that cannot be asked."""
    try:
        free, total = torch.cuda.mem_get_info(device)
    except (RuntimeError, AssertionError, ValueError):
        return None, None
    return int(free), int(total)


def available_memory() -> int | None:
    """Bytes of host memory available to new allocations (Linux ``MemAvailable``), or None elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
