"""What a measurement depends on, recorded beside it: versions, the source commit, device, dtype, threads."""

from __future__ import annotations

import platform
import subprocess
import time
from pathlib import Path

import torch

import llmrun
from llmrun.devices import DTYPE_NAMES, cpu_model_name
from llmrun.model.quant import held_weights
from llmrun.model.transformer import Transformer
from llmrun.profiler.costs import decode_weight_bytes, model_widths


def environment(model: Transformer, model_name: str) -> dict[str, object]:
    """``env`` of a bench report: versions, commit, device, dtype, threads, model, sizes (bytes), time.

    ``n_params`` and ``model_bytes`` count the weights as the model holds them (quantized ones at their
    stored size: ``llmrun.model.quant.held_weights``); ``weight_bytes`` is the cost model's bytes of the
    weights one decode step reads (``llmrun.profiler.costs.decode_weight_bytes``).
    """
    n_params, model_bytes = held_weights(model)
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
        "n_params": n_params,
        "model_bytes": model_bytes,
        "weight_bytes": decode_weight_bytes(model.args, model_widths(model)),
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
