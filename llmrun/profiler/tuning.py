"""The CPU decode kernel chosen by measuring the candidates on this machine, never by guessing from its
instruction set.

A decode step at batch 1 is a chain of matrix-vector products, and which kernel streams a weight
matrix fastest (``torch.mm``, oneDNN's linear on plain or prepacked weights, oneDNN's 1x1
convolution on reordered weights) depends on the CPU, its vector units, the dtype, the shapes and
the PyTorch build. So the first time a model of a given shape decodes on a CPU, each candidate of
``llmrun.model.fastpath.gemv.PRODUCTS`` that runs the dtype here is timed over a sample of the
model's own decode matrices (the first layers, up to ``SAMPLE_BYTES``, and up to ``HEAD_ROWS``
rows of the lm_head), the pass over all of them is estimated from the sample, and the fastest
kernel is kept. The measurement takes about a second for a small model, and the sample bounds
both its time and the extra memory of a packed copy whatever the model's size.

A kernel that keeps a second, reordered copy of the weights (``packed``, ``conv``) is chosen only
where that copy fits in the memory available now; otherwise the fastest kernel without one.
Choices are cached in ``$LLMRUN_HOME/tuning/cpu.json`` under a key of CPU model, threads, torch
version, dtype, batch and matrix shapes; ``llmrun peaks --refresh`` forgets them.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from llmrun.devices import available_memory, cpu_model_name
from llmrun.jsonfiles import read_cache, write_json_atomic
from llmrun.model.fastpath import fast_enabled
from llmrun.model.fastpath.gemv import PRODUCTS, available
from llmrun.model.quant import is_quantized, native
from llmrun.model.transformer import Transformer
from llmrun.paths import llmrun_home
from llmrun.profiler.attention_tuning import cache_path as attention_cache_path
from llmrun.profiler.attention_tuning import tune_prefill_attention
from llmrun.profiler.costs import decode_weight_bytes
from llmrun.profiler.kernel_floor import decode_matrices, products_pass
from llmrun.profiler.quant_tuning import cache_path as quant_cache_path
from llmrun.profiler.quant_tuning import tune_quant
from llmrun.profiler.timers import BUSY_CHOICES, BUSY_SOURCE, OtherLoad, time_calls

SAMPLE_BYTES = 64 * 2**20  # layer weights timed per kernel (at least one layer)
HEAD_ROWS = 16384  # lm_head rows timed per kernel
REPEATS = 5
COPYING = frozenset({"packed", "conv"})  # kernels that keep a reordered copy of the weights
CACHE_VERSION = 1

Measure = Callable[[Transformer, list[str], int], dict[str, float]]
"""(model, kernel names, batch) -> estimated seconds of one pass over all decode matrices, per kernel."""


@dataclass
class KernelChoice:
    """The kernel that runs CPU decode and why: ``measured`` now, ``cached`` from an earlier
    measurement, ``BUSY_SOURCE`` (measured now on a busy CPU, so not cached), ``LLMRUN_CPU_GEMV``,
    or ``only candidate``; ``seconds`` per candidate (estimated pass over all
    decode weights) when measured."""

    kernel: str
    source: str
    seconds: dict[str, float] = field(default_factory=dict)
    note: str = ""

    def to_json(self) -> dict:
        """The choice as plain JSON types (bench and profile reports carry it)."""
        return asdict(self)


def choose_cpu_gemv(
    model: Transformer, batch: int = 1, *, refresh: bool = False, measure: Measure | None = None
) -> KernelChoice:
    """The CPU decode kernel for ``model`` (on the CPU) at ``batch``: ``LLMRUN_CPU_GEMV`` when set to
    a kernel, else the cached measurement, else a measurement now (cached for next time)."""
    forced = os.environ.get("LLMRUN_CPU_GEMV", "auto")
    if forced != "auto":
        return KernelChoice(forced, "LLMRUN_CPU_GEMV")
    dtype = model.lm_head.weight.dtype
    candidates = [k for k in PRODUCTS if available(k, dtype)]
    if len(candidates) == 1:  # nothing to choose between (oneDNN cannot run the dtype here)
        return KernelChoice(candidates[0], "only candidate")
    key = _key(model, batch, candidates)
    if key in BUSY_CHOICES and not refresh:  # measured busy earlier in this process
        return BUSY_CHOICES[key]
    cache = read_cache(cache_path())
    entry = cache.get(key) if cache.get("version") == CACHE_VERSION and not refresh else None
    if isinstance(entry, dict) and entry.get("kernel") in candidates:
        return KernelChoice(entry["kernel"], "cached", entry.get("seconds", {}), entry.get("note", ""))
    with OtherLoad() as load:
        seconds = (measure or measure_passes)(model, candidates, batch)
    kernel, note = _pick(seconds, decode_weight_bytes(model.args, dtype.itemsize))
    if load.busy:  # timings of a busier machine than the next run's: used in this process, measured again then
        BUSY_CHOICES[key] = KernelChoice(kernel, BUSY_SOURCE, seconds, note)
        return BUSY_CHOICES[key]
    measured = {"kernel": kernel, "seconds": seconds, "note": note, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json_atomic(cache_path(), {**cache, "version": CACHE_VERSION, key: measured})
    return KernelChoice(kernel, "measured", seconds, note)


def tune_decode(model: Transformer) -> KernelChoice | None:
    """Give a CPU model the decode kernel measured fastest for it (``model.decode_gemv``); None off the
    CPU or with the fast path off (``LLMRUN_FAST=0``).

    The first measurement of a shape shows a status line on a terminal's stderr; later runs read the cache.
    CPU prefill's attention kernel is chosen too, whatever the path (``attention_tuning``), after the
    quantized weights' kernels, whose measurement frees the forms it does not keep.
    """
    # each quantized weight kind's kernel is measured; float products then take torch.mm
    chosen = tune_quant(model) if is_quantized(model) else None
    tune_prefill_attention(model)
    if chosen is not None:
        model.decode_gemv = "mm"
        note = ", ".join(sorted(set(chosen.values()))) + ("" if native.bound() else " (native kernels not built)")
        return KernelChoice("mm", "quantized weights", note=note)
    if model.lm_head.weight.device.type != "cpu" or not fast_enabled():  # only the CPU fast path uses it
        return None
    from rich.console import Console

    console = Console(stderr=True)
    with console.status("measuring the CPU decode kernels for this model (once; cached)", spinner="dots"):
        choice = choose_cpu_gemv(model)
    model.decode_gemv = choice.kernel
    return choice


def cache_path() -> Path:
    """Where measured kernel choices are kept."""
    return llmrun_home() / "tuning" / "cpu.json"


def forget() -> None:
    """Drop every cached choice (the next decode measures again)."""
    BUSY_CHOICES.clear()
    cache_path().unlink(missing_ok=True)
    quant_cache_path().unlink(missing_ok=True)
    attention_cache_path().unlink(missing_ok=True)


def _pick(seconds: dict[str, float], weight_bytes: int) -> tuple[str, str]:
    """The fastest kernel, unless it needs a copy of ``weight_bytes`` that does not fit in free memory."""
    fastest = min(seconds, key=seconds.get)
    free = available_memory()
    if fastest in COPYING and free is not None and free < 1.25 * weight_bytes:
        plain = {k: s for k, s in seconds.items() if k not in COPYING}
        chosen = min(plain, key=plain.get)
        return chosen, f"{fastest} was faster but its copy of the weights does not fit in {free} free bytes"
    return fastest, ""


def _key(model: Transformer, batch: int, candidates: list[str]) -> str:
    """What a measurement depends on: the CPU, threads, torch, dtype, batch, the matrix shapes and the
    candidates (a choice made without the native kernel is made again where it is built)."""
    shapes = sorted({tuple(w.shape) for w in decode_matrices(model)})
    what = [cpu_model_name(), torch.get_num_threads(), torch.__version__, str(model.lm_head.weight.dtype), batch]
    digest = hashlib.sha256(json.dumps([*what, len(model.model.layers), shapes]).encode()).hexdigest()[:16]
    return f"{what[0]}|{what[1]} threads|torch {what[2]}|{what[3]}|batch {batch}|{digest}|{'+'.join(candidates)}"


def measure_passes(model: Transformer, kernels: list[str], batch: int) -> dict[str, float]:
    """Estimated seconds of one pass over all decode matrices per kernel, timed over a sample of them:
    the first layers (scaled by layers / sampled layers) and the first lm_head rows (scaled by rows)."""
    mats = decode_matrices(model)
    per_layer = 4  # q/k/v, o, gate/up, down
    layers = (len(mats) - 1) // per_layer
    layer_bytes = sum(w.nbytes for w in mats[:per_layer])
    sampled = max(1, min(layers, SAMPLE_BYTES // max(layer_bytes, 1)))
    head = mats[-1][:HEAD_ROWS]
    groups = [(mats[: per_layer * sampled], layers / sampled), ([head], mats[-1].shape[0] / head.shape[0])]
    inputs = {k: torch.randn(batch, k).to(head.dtype) for k in {w.shape[1] for w in mats}}
    seconds = {}
    with torch.inference_mode():
        for kernel in kernels:
            seconds[kernel] = sum(
                factor * statistics.median(time_calls(products_pass(group, inputs, kernel, batch)(), "cpu", REPEATS))
                for group, factor in groups
            )
    return seconds
