"""The kernel floor of decode: one pass of matrix-vector products over every weight a decode step multiplies by.

A pass runs (B, K) @ (K, N) products over the fused matrices the fast path multiplies (q/k/v, o,
gate/up and down per layer, then the lm_head) with nothing around them, so no Python-level decode
through the same kernels can beat its time. ``gemv_floor`` keeps the fastest of several kernels
(torch's and oneDNN's); ``fastest_gemv`` ranks the fast path's own CPU kernels
(``llmrun.model.fastpath.gemv.PRODUCTS``) by the same measurement. A model with quantized weights
has one pass: ``llmrun.model.quant.product`` over each matrix in the form its kernel holds (the
kernel chosen for it, or the default one), as its decode multiplies by them.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from llmrun.model.fastpath.gemv import PRODUCTS, available, onednn_supported
from llmrun.model.quant import default_kernel, is_quantized, product, product_weights
from llmrun.model.quant.product import Weight
from llmrun.model.transformer import Transformer, fuse_projections
from llmrun.profiler.timers import time_calls

PassBuilder = Callable[[], Callable[[], None]]
"""Prepares a kernel (packing the weights where it keeps its own copy) and returns one pass of it."""

ONEDNN_LABELS = {"onednn": "oneDNN linear", "packed": "oneDNN linear, prepacked", "conv": "oneDNN 1x1 conv, reordered"}
"""``gemv_kernels``' names of the fast path's oneDNN kernels (``PRODUCTS`` keys)."""


def decode_matrices(model: Transformer) -> list[Weight]:
    """Every weight matrix (N, K) a decode step multiplies by, in order: fused q/k/v, o, gate/up, down
    per layer, then the lm_head (fusing the model's projections first, in place); float tensors, or
    ``QuantWeight``s and stacks of parts (``llmrun.model.quant``) in a quantized model."""
    fuse_projections(model)
    mats = []
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        mats += [attn.wqkv, attn.o_proj.weight, mlp.wgate_up, mlp.down_proj.weight]
    mats.append(model.lm_head.weight)
    return mats


def _inputs(mats: list[Weight], batch: int, device: torch.device, dtype: torch.dtype) -> dict[int, torch.Tensor]:
    """One random input (batch, K) per input width K of the matrices, in ``dtype`` on ``device``."""
    return {k: torch.randn(batch, k, device=device).to(dtype) for k in {w.shape[1] for w in mats}}


def quantized_pass(mats: list[Weight], inputs: dict[int, torch.Tensor]) -> PassBuilder:
    """A builder of one pass of ``product`` over ``mats`` (their kernels' forms are made at load)."""

    def build() -> Callable[[], None]:
        def one_pass() -> None:
            for w in mats:
                product(inputs[w.shape[1]], w)

        return one_pass

    return build


def products_pass(mats: list[torch.Tensor], inputs: dict[int, torch.Tensor], kernel: str, batch: int) -> PassBuilder:
    """A builder of one pass through the fast path's ``PRODUCTS[kernel]`` over ``mats`` (each (N, K)).

    ``inputs`` maps each input width K to an input (batch, K) in the matrices' dtype and device.
    Each product is added to an output (batch, N), as the fast path's residual adds are, on
    weights packed the kernel's way when the builder runs.
    """

    def build() -> Callable[[], None]:
        products = PRODUCTS[kernel](batch)
        packed = [products.pack(w) for w in mats]
        sums = [torch.zeros(batch, w.shape[0], device=w.device, dtype=w.dtype) for w in mats]
        products.keep(*inputs.values(), *sums)

        def one_pass() -> None:
            for w, p, acc in zip(mats, packed, sums, strict=True):
                products.accumulate(acc, inputs[w.shape[1]], p, None)

        return one_pass

    return build


def gemv_kernels(model: Transformer, batch: int = 1) -> dict[str, PassBuilder]:
    """Kernel name -> a builder of one pass of matrix-vector products over all decode weights.

    ``torch.mm`` on the transposed weight into a preallocated output, ``F.linear``, ``torch.mv``
    (batch 1) and, on a CPU with oneDNN for the dtype, the fast path's oneDNN kernels
    (``ONEDNN_LABELS``) and, where built, llmrun's native float32 kernel, as ``products_pass`` runs
    them. A pass's packed copy of the weights lives as long as the pass function. A quantized model
    has the one pass of ``quantized_pass``, named after the kernels its weights run through.
    """
    mats = decode_matrices(model)
    device, dtype = model.model.norm.weight.device, model.model.norm.weight.dtype
    inputs = _inputs(mats, batch, device, dtype)
    if is_quantized(model):
        kernels = sorted({w.kernel or default_kernel(w, w.dtype) for w in product_weights(model)})
        return {f"quantized products ({', '.join(kernels)})": quantized_pass(mats, inputs)}

    def mm() -> Callable[[], None]:
        outs = [torch.empty(batch, w.shape[0], device=device, dtype=dtype) for w in mats]
        transposed = [w.t() for w in mats]

        def one_pass() -> None:
            for w_t, out in zip(transposed, outs, strict=True):
                torch.mm(inputs[w_t.shape[0]], w_t, out=out)

        return one_pass

    def linear() -> None:
        for w in mats:
            F.linear(inputs[w.shape[1]], w)

    def mv() -> None:
        for w in mats:
            torch.mv(w, inputs[w.shape[1]][0])

    kernels: dict[str, PassBuilder] = {"torch.mm": mm, "F.linear": lambda: linear}
    if batch == 1:
        kernels["torch.mv"] = lambda: mv
    if device.type == "cpu" and onednn_supported(dtype):
        kernels |= {label: products_pass(mats, inputs, kernel, batch) for kernel, label in ONEDNN_LABELS.items()}
    if device.type == "cpu" and available("native", dtype):
        kernels["llmrun native"] = products_pass(mats, inputs, "native", batch)
    return kernels


def _median_seconds(builders: dict[str, PassBuilder], device: torch.device, repeats: int) -> dict[str, float]:
    """Median seconds of one pass per kernel, built and timed one at a time (one packed copy at most)."""
    seconds = {}
    with torch.inference_mode():
        for name, build in builders.items():
            seconds[name] = statistics.median(time_calls(build(), device, repeats))
    return seconds


def gemv_floor(model: Transformer, batch: int = 1, repeats: int = 5) -> tuple[float, str]:
    """(seconds, kernel name) of the fastest pass over every matrix the decode multiplies by.

    Every kernel of ``gemv_kernels`` is timed, one at a time; the result is the fastest one's median
    over ``repeats`` passes after a warm-up pass. The embedding is a row lookup and not counted.
    """
    seconds = _median_seconds(gemv_kernels(model, batch), model.lm_head.weight.device, repeats)
    name = min(seconds, key=seconds.get)
    return seconds[name], name


def fastest_gemv(model: Transformer, batch: int = 1, repeats: int = 5) -> tuple[str, dict[str, float]]:
    """The fastest of the fast path's CPU kernels for ``model`` at ``batch``, and each one's seconds per pass.

    The kernels are the ``PRODUCTS`` names (what ``cpu_gemv`` and ``LLMRUN_CPU_GEMV`` accept) that
    run the model's dtype here: ``mm`` always, the oneDNN ones where ``onednn_supported``. Each is
    timed as ``gemv_floor`` times a kernel (median of ``repeats`` passes over all decode weights).
    The model must be on the CPU.
    """
    mats = decode_matrices(model)
    device, dtype = mats[0].device, mats[0].dtype
    if device.type != "cpu":
        raise ValueError(f"fastest_gemv ranks CPU kernels; the model is on {device}")
    inputs = _inputs(mats, batch, device, dtype)
    kernels = [k for k in PRODUCTS if k == "mm" or onednn_supported(dtype)]
    seconds = _median_seconds({k: products_pass(mats, inputs, k, batch) for k in kernels}, device, repeats)
    return min(seconds, key=seconds.get), seconds
