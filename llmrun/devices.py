"""Turn ``--device`` and ``--dtype`` strings into torch objects, or say clearly why not."""

from __future__ import annotations

import re

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

    fp32 is the CPU default because PyTorch's bf16 matrix-vector kernels move only about half
    the memory bandwidth of its fp32 ones here (see ROOFLINE.md), so fp32 decodes faster.
    """
    spec = spec.strip().lower()
    if spec == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if spec not in DTYPES:
        raise LlmrunError(f"--dtype {spec!r} is not supported; use auto, bf16, fp16 or fp32")
    return DTYPES[spec]


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that host timers measure it; no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
