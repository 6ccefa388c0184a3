"""The kernel of each quantized weight, chosen by timing the candidates on the model's own shapes.

Where more than one kernel computes a quantized weight's products correctly
(``llmrun.model.quant.candidates``: llmrun's native C kernels, a weight-only int8/int4 kernel in the
model's dtype, the same on bf16 activations, dequantize-then-multiply), which is fastest depends on
the CPU's vector units and on the shape, so it is measured: per distinct (format, shape), per
candidate, one decode-sized product (batch rows) on every weight of that kind in turn, the median
of a few such passes. A pass streams the weights from memory as decode does (one weight alone
would sit in the cache and favour the kernel with the most arithmetic per byte). A kernel that
rounds the activations (bf16 for a float32 model) must beat the fastest one that does not by
``ROUNDING_MARGIN``.

The choice is cached under ``$LLMRUN_HOME/tuning/quant.json`` keyed by device, threads, torch
version, dtype, batch, format, shape and the candidates, and set on every weight of that kind
(``QuantWeight.kernel``); ``llmrun peaks --refresh`` forgets it with the rest of the tuning
directory's choices when it removes the file. The model is then prepared for the choices
(``llmrun.model.quant.prepare_model``: the stored codes freed where the chosen kernel holds its own
copy) and each weight settled (``llmrun.model.quant.settle``: its stored scales freed where the
chosen form holds its own), so a later choice (at another thread count) keeps the first one.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from llmrun.allocator import return_freed_memory
from llmrun.devices import cpu_model_name
from llmrun.jsonfiles import read_cache, write_json_atomic
from llmrun.model.quant import KERNELS, QuantWeight, candidates, prepare_model, product_weights, settle
from llmrun.model.transformer import Transformer
from llmrun.paths import llmrun_home
from llmrun.profiler.timers import OtherLoad, time_calls

REPEATS = 5  # passes per timing
ROUNDS = 3  # timings per candidate still in the running
CONTENDERS = 1.5  # a candidate this many times slower than the fastest after a round is timed no more
CACHE_VERSION = 3
# How much faster a kernel that rounds the activations (to bf16 for a float32 model) must be than the
# fastest one that does not, to be chosen: rounding every product's input moves greedy output and
# perplexity away from the float model's (bf16 kernels on the default model agreed on 8 of 20 prompts).
ROUNDING_MARGIN = 1.25


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
        for kind, weights in kinds.items():
            names = candidates(weights[0], weights[0].dtype)
            key = f"{kind}|{'+'.join(names)}"  # a choice among other candidates (native kernels or not) is another
            kernel = cache.get(key) if cache.get(key) in names else None
            if kernel is None and len(names) == 1:
                kernel = names[0]  # nothing to choose, so nothing cached (a settled weight has only its own kernel)
            elif kernel is None:
                kernel = measured[key] = _fastest(weights, names, batch)
            _choose(weights, kernel)
            chosen[kind] = kernel
    prepare_model(model)  # the chosen forms made, the stored codes freed where a kernel holds its own
    for weights in kinds.values():
        for weight in weights:
            settle(weight)
    return_freed_memory()  # the other candidates' forms and the codes just dropped
    if not load.busy:  # a busy CPU's timings serve this run and are measured again in the next
        cache.update(measured)
    write_json_atomic(cache_path(), {**cache, "version": CACHE_VERSION})
    return chosen


def _choose(weights: list[QuantWeight], kernel: str) -> None:
    """Give ``weights`` (one kind) ``kernel``, dropping the forms the other candidates made."""
    for weight in weights:
        weight.kernel = kernel
        _drop_forms(weight, keep=KERNELS[kernel])


def _drop_forms(weight: QuantWeight, keep=None) -> None:
    """Drop every kernel form of ``weight`` but ``keep``'s (and its copy of the codes). Without ``keep`` (a
    candidate just timed), only where the stored codes remain to make them again: a weight whose stored
    codes are gone keeps the only forms it can multiply by."""
    if keep is None and weight.codes is None:
        return
    kept = () if keep is None else (f"{keep.name}:", keep.codes_key or f"{keep.name}:")
    weight.prepared = {k: v for k, v in weight.prepared.items() if kept and k.startswith(kept)}


def cache_path() -> Path:
    """Where the measured quantized kernel choices are kept."""
    return llmrun_home() / "tuning" / "quant.json"


def _fastest(weights: list[QuantWeight], names: list[str], batch: int) -> str:
    """The candidate with the lowest median time of a pass of (batch, K) products over ``weights`` (one kind).

    ``ROUNDS`` rounds time the candidates in turn, so that a slow spell of the machine falls on all of
    them; after each, those slower than ``CONTENDERS`` times the fastest so far are timed no more. A
    candidate's forms are dropped once it is timed, so that the forms of one candidate at most are in
    memory at a time.
    """
    first = weights[0]
    x = torch.randn(batch, first.shape[1], device=first.device).to(first.dtype)
    samples: dict[str, list[float]] = {name: [] for name in names}
    contenders = list(names)
    with torch.inference_mode():
        for _ in range(ROUNDS):
            for name in contenders:
                kernel = KERNELS[name]

                def one_pass(kernel=kernel) -> None:
                    for weight in weights:
                        kernel.run(x, weight)

                samples[name].append(statistics.median(time_calls(one_pass, first.device, REPEATS)))
                for weight in weights:
                    _drop_forms(weight)
            best = min(statistics.median(samples[name]) for name in contenders)
            contenders = [name for name in contenders if statistics.median(samples[name]) <= CONTENDERS * best]
    seconds = {name: statistics.median(times) for name, times in samples.items()}
    return pick(seconds, {name for name in names if KERNELS[name].rounds(first.dtype)})


def pick(seconds: dict[str, float], rounding: set[str]) -> str:
    """The fastest kernel by ``seconds``, unless it is one of ``rounding`` (kernels that round the activations)
    and not ``ROUNDING_MARGIN`` times as fast as the fastest of the others."""
    fastest = min(seconds, key=seconds.get)
    exact = [name for name in seconds if name not in rounding]
    if fastest not in rounding or not exact:
        return fastest
    best_exact = min(exact, key=seconds.get)
    return fastest if seconds[best_exact] > ROUNDING_MARGIN * seconds[fastest] else best_exact


def _key(weight: QuantWeight, batch: int) -> str:
    """What a choice depends on: the device, threads, torch, dtype, batch, format and shape."""
    device = cpu_model_name() if weight.device.type == "cpu" else torch.cuda.get_device_name(weight.device)
    n, k = weight.shape
    threads = torch.get_num_threads()
    return f"{device}|{threads} threads|torch {torch.__version__}|{weight.dtype}|batch {batch}|{weight.format}|{n}x{k}"
