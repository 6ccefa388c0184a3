"""What a measurement depends on, recorded beside it: versions, the source commit, device, dtype, threads."""

from __future__ import annotations

import platform
import subprocess
import time
from pathlib import Path

import torch

import llmrun
from llmrun.devices import DTYPE_NAMES, cpu_model_name
from llmrun.model.quant import weight_width
from llmrun.model.transformer import Transformer
from llmrun.profiler.costs import decode_weight_bytes


def environment(model: Transformer, model_name: str) -> dict[str, object]:
    """``env`` of a bench report: versions, commit, device, dtype, threads, model, sizes (bytes), time.

    ``weight_bytes`` is the cost model's bytes of the weights one decode step reads
    (``llmrun.profiler.costs.decode_weight_bytes``).
    """
    weight = model.lm_head.weight
    device = weight.device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model_name()
    return {
        "llmrun_version": llmrun.__version__,
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": str(device),
        "device_name": device_name,
        "dtype": DTYPE_NAMES.get(weight.dtype, str(weight.dtype)),
        "threads": torch.get_num_threads(),
        "model": model_name,
        "n_params": sum(p.numel() for p in model.parameters()),
        "weight_bytes": decode_weight_bytes(model.args, weight_width(model)),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def git_commit() -> str | None:
    """The commit of the llmrun source tree (``+dirty`` with uncommitted changes), or None outside git."""
    root = Path(llmrun.__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", "llmrun"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")
