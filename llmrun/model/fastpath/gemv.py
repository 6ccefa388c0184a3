"""The matrix-vector kernels of CPU decode: one small class per kernel, chosen by name.

Each ``_Products`` subclass multiplies a decode step's activations x (B, K) by its weights
(N, K), through ``torch.mm``, oneDNN (linear, prepacked linear, 1x1 convolution on reordered
weights) or llmrun's native float32 kernel (``llmrun.model.quant.native``). ``PRODUCTS`` maps the
names ``LLMRUN_CPU_GEMV`` accepts to them; ``available`` says which run a dtype here.
"""

from __future__ import annotations

import os

import torch

from llmrun.errors import LlmrunError
from llmrun.model.quant import native
from llmrun.model.quant.product import Weight, product_into


def cpu_gemv(dtype: torch.dtype, choice: str | None = None) -> str:
    """The matrix-vector kernel that will run CPU decode in ``dtype``: ``choice``, else ``LLMRUN_CPU_GEMV``.

    The names are ``auto``, ``conv``, ``packed``, ``onednn``, ``native`` and ``mm``; any other raises
    ``LlmrunError``. ``auto`` (the default) means the kernel measured for the model
    (``llmrun.profiler.tuning`` passes it as ``choice``); without a measurement it is ``mm``: no
    kernel is assumed to win on a CPU it was not timed on. ``conv`` is oneDNN's 1x1 convolution on
    reordered weights, which adds into the residual in place; ``packed`` is oneDNN's linear on
    weights reordered for the batch size; both hold a second, reordered copy of the weights.
    ``onednn`` is the linear on plain weights (no copy); ``native`` is llmrun's float32 kernel on
    plain weights, the residual add in the same kernel; ``mm`` is ``torch.mm``. A choice becomes
    ``mm`` where its kernel cannot run ``dtype`` here (``available``). Only ``mm`` and ``native``
    let a step allocate nothing: oneDNN's linear returns fresh outputs, and its convolution takes a
    fresh scratchpad per call.
    """
    choice = choice or os.environ.get("LLMRUN_CPU_GEMV", "auto")
    if choice not in PRODUCTS and choice != "auto":
        raise LlmrunError(
            f"LLMRUN_CPU_GEMV={choice[:40]!r} is not a kernel: set it to auto, conv, packed, onednn, native or mm"
        )
    return choice if choice != "auto" and available(choice, dtype) else "mm"


def available(kernel: str, dtype: torch.dtype) -> bool:
    """Whether the decode kernel ``kernel`` (a ``PRODUCTS`` name) runs ``dtype`` here: oneDNN's where oneDNN
    does; llmrun's native float32 kernel where a build with its four-row form is bound; ``mm`` always."""
    if kernel == "native":
        return dtype == torch.float32 and native.vectorized()
    return kernel == "mm" or onednn_supported(dtype)


def onednn_supported(dtype: torch.dtype) -> bool:
    """Whether oneDNN's CPU linear runs ``dtype`` here (fp32 always with oneDNN; bf16 with CPU support)."""
    if not torch.backends.mkldnn.is_available() or dtype not in (torch.float32, torch.bfloat16):
        return False
    return dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


class _Products:
    """How a decode step multiplies x (B, K) by its weights, for batch B; one subclass per kernel.

    ``pack(w)`` turns a weight (N, K) into what the products multiply by; ``product(out, x, w, b)``
    writes x W^T + b (B, N) into ``out``; ``accumulate(acc, x, w, b)`` adds it to ``acc`` and returns
    the tensor holding the sum (``acc`` itself unless the kernel has no in-place form). ``keep``
    names the buffers used in every step, for kernels that prepare something per buffer.

    A quantized weight (``llmrun.model.quant``) is kept as it is and multiplied through
    ``llmrun.model.quant.product``, whose kernels prepared their forms at load; a float one goes
    through the subclass's kernel (``pack_dense``, ``dense_product``, ``dense_accumulate``).
    """

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def keep(self, *buffers: torch.Tensor) -> None:
        """Nothing to prepare unless a kernel says otherwise."""

    def pack(self, weight: Weight) -> Weight:
        return self.pack_dense(weight) if isinstance(weight, torch.Tensor) else weight

    def product(self, out: torch.Tensor, x: torch.Tensor, w: Weight, bias: torch.Tensor | None) -> None:
        if isinstance(w, torch.Tensor):
            self.dense_product(out, x, w, bias)
        else:
            product_into(out, x, w, bias, accumulate=False)

    def accumulate(self, acc: torch.Tensor, x: torch.Tensor, w: Weight, bias: torch.Tensor | None):
        if isinstance(w, torch.Tensor):
            return self.dense_accumulate(acc, x, w, bias)
        product_into(acc, x, w, bias, accumulate=True)
        return acc

    def pack_dense(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dense_product(self, out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
        raise NotImplementedError

    def dense_accumulate(self, acc: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None):
        raise NotImplementedError


class _MatmulProducts(_Products):
    """``torch.mm``/``addmm`` on transposed weights, into the given buffers (no allocation)."""

    def pack_dense(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t()

    def dense_product(self, out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
        if bias is None:
            torch.mm(x, w, out=out)
        else:
            torch.addmm(bias, x, w, out=out)

    def dense_accumulate(self, acc: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None):
        acc.addmm_(x, w)
        if bias is not None:
            acc.add_(bias)
        return acc


class _LinearProducts(_Products):
    """oneDNN's linear on plain weights; its outputs are fresh tensors (the op has no ``out=``)."""

    def pack_dense(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def dense_product(self, out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
        out.copy_(torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], ""))

    def dense_accumulate(self, acc: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None):
        return torch.ops.mkldnn._linear_pointwise.binary(x, acc, w, bias, "add")  # acc + x W^T (+ b), one kernel


class _PackedLinearProducts(_LinearProducts):
    """oneDNN's linear on weights it reordered for this batch size (a second copy of the weights)."""

    def pack_dense(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(weight, self.batch)


class _ConvProducts(_Products):
    """oneDNN's 1x1 convolution on reordered weights: x (B, K, 1, 1) by W (N, K, 1, 1), accumulated in place.

    The in-place form adds the product to its output tensor, so ``accumulate`` is one kernel and
    ``product`` zeroes the output first. The weights are a second, reordered copy. The 4-d views
    of the buffers given to ``keep`` are made once, not two per product.
    """

    def __init__(self, batch: int) -> None:
        super().__init__(batch)
        # id(buffer) -> (buffer, its 4-d view); holding the buffer keeps its id from being reused
        self.views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(self, *buffers: torch.Tensor) -> None:
        for buffer in buffers:
            self.views[id(buffer)] = (buffer, buffer.view(*buffer.shape, 1, 1))

    def as_4d(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (B, N) as (B, N, 1, 1): the kept view when ``t`` is a kept buffer, else a new one."""
        kept = self.views.get(id(t))
        return kept[1] if kept is not None else t.view(*t.shape, 1, 1)

    def pack_dense(self, weight: torch.Tensor) -> torch.Tensor:
        n, k = weight.shape
        return torch.ops.mkldnn._reorder_convolution_weight(
            weight.view(n, k, 1, 1), [0, 0], [1, 1], [1, 1], 1, [self.batch, k, 1, 1]
        )

    def dense_product(self, out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
        out.zero_()
        self.dense_accumulate(out, x, w, bias)

    def dense_accumulate(self, acc: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None):
        torch.ops.mkldnn._convolution_pointwise_(
            self.as_4d(acc), self.as_4d(x), w, bias,
            [0, 0], [1, 1], [1, 1], 1, "add", 1.0, None, [], None,
        )  # fmt: skip
        return acc


class _NativeProducts(_MatmulProducts):
    """llmrun's native float32 kernel on the weights as they are (no copy), into the given buffers, the
    residual add in the same kernel; ``torch.mm`` for a weight whose shape it does not take."""

    def pack_dense(self, weight: torch.Tensor) -> torch.Tensor:
        # the weight itself (N, K) where the kernel takes it, else torch.mm's transposed view
        return weight if native.takes_float(*weight.shape) and weight.is_contiguous() else weight.t()

    def dense_product(self, out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
        if not _all_contiguous(w, out, x):  # a weight packed for torch.mm (or an odd buffer)
            super().dense_product(out, x, w, bias)
            return
        native.gemv_float(out, x, w, accumulate=False)
        if bias is not None:
            out.add_(bias)

    def dense_accumulate(self, acc: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None):
        if not _all_contiguous(w, acc, x):
            return super().dense_accumulate(acc, x, w, bias)
        native.gemv_float(acc, x, w, accumulate=True)
        if bias is not None:
            acc.add_(bias)
        return acc


def _all_contiguous(*tensors: torch.Tensor) -> bool:
    return all(t.is_contiguous() for t in tensors)


# LLMRUN_CPU_GEMV's kernel names -> their products
PRODUCTS = {
    "mm": _MatmulProducts, "onednn": _LinearProducts, "packed": _PackedLinearProducts, "conv": _ConvProducts,
    "native": _NativeProducts,
}  # fmt: skip
