"""The kernel of each quantized weight, chosen by timing the candidates on the model's own shapes.

Where more than one kernel computes a quantized weight's products correctly
(``llmrun.model.quant.candidates``: a weight-only int8/int4 kernel in the model's dtype, the same on
bf16 activations, dequantize-then-multiply), which is fastest depends on the CPU's vector units and
on the shape, so it is measured: one decode-sized product (batch rows) per distinct (format, shape),
per candidate, the median of a few calls. The choice is cached under
``$LLMRUN_HOME/tuning/quant.json`` keyed by device, threads, torch version, dtype, batch, format and
shape, and set on every weight of that kind (``QuantWeight.kernel``); ``llmrun peaks --refresh``
forgets it with the rest of the tuning directory's choices when it removes the file. A weight is
then settled (``llmrun.model.quant.settle``: its stored scales freed where the chosen form holds its
own), so a later choice (at another thread count) keeps the first one.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from llmrun.allocator import return_freed_memory
from llmrun.devices import cpu_model_name
from llmrun.jsonfiles import read_cache, write_json_atomic
from llmrun.model.quant import KERNELS, QuantWeight, candidates, product_weights, settle
from llmrun.model.transformer import Transformer
from llmrun.paths import llmrun_home
from llmrun.profiler.timers import OtherLoad, time_calls

REPEATS = 5
CACHE_VERSION = 1


def tune_quant(model: Transformer, batch: int = 1) -> dict[str, str]:
    """Set the measured kernel on every quantized weight of ``model``; returns kind key -> kernel name."""
    kinds: dict[str, list[QuantWeight]] = {}
    for weight in product_weights(model):
        kinds.setdefault(_key(weight, batch), []).append(weight)
    if not kinds:
        return {}
    cache = read_cache(cache_path())
    if cache.get("version") != CACHE_VERSION:
        cache = {}
    chosen, measured = {}, {}
    with OtherLoad() as load:
        for key, weights in kinds.items():
            names = candidates(weights[0], weights[0].dtype)
            kernel = cache.get(key) if cache.get(key) in names else None
            if kernel is None and len(names) == 1:
                kernel = names[0]  # nothing to choose, so nothing cached (a settled weight has only its own kernel)
            elif kernel is None:
                kernel = measured[key] = _fastest(weights[0], names, batch)
            _settle_kind(weights, kernel)
            chosen[key] = kernel
    if not load.busy:  # a busy CPU's timings serve this run and are measured again in the next
        cache.update(measured)
    write_json_atomic(cache_path(), {**cache, "version": CACHE_VERSION})
    return chosen


def _settle_kind(weights: list[QuantWeight], kernel: str) -> None:
    """Give ``weights`` (one kind) ``kernel``: its form made now, the other candidates' dropped."""
    chosen_kernel = KERNELS[kernel]
    for weight in weights:
        weight.kernel = kernel
        keep = (f"{kernel}:", chosen_kernel.codes_key or f"{kernel}:")
        weight.prepared = {k: v for k, v in weight.prepared.items() if k.startswith(keep)}
        chosen_kernel.form(weight, chosen_kernel.compute or weight.dtype)
        settle(weight)  # the stored scales and zeros, where the chosen form holds its own
    return_freed_memory()  # the other candidates' forms just dropped


def cache_path() -> Path:
    """Where the measured quantized kernel choices are kept."""
    return llmrun_home() / "tuning" / "quant.json"


def _fastest(weight: QuantWeight, names: list[str], batch: int) -> str:
    """The candidate with the lowest median time of one (batch, K) product on ``weight``."""
    x = torch.randn(batch, weight.shape[1], device=weight.device).to(weight.dtype)
    seconds = {}
    with torch.inference_mode():
        for name in names:
            kernel = KERNELS[name]
            seconds[name] = statistics.median(time_calls(lambda k=kernel: k.run(x, weight), weight.device, REPEATS))
    return min(seconds, key=seconds.get)


def _key(weight: QuantWeight, batch: int) -> str:
    """What a choice depends on: the device, threads, torch, dtype, batch, format and shape."""
    device = cpu_model_name() if weight.device.type == "cpu" else torch.cuda.get_device_name(weight.device)
    n, k = weight.shape
    threads = torch.get_num_threads()
    return f"{device}|{threads} threads|torch {torch.__version__}|{weight.dtype}|batch {batch}|{weight.format}|{n}x{k}"
