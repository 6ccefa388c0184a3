"""``product(x, weight, bias)``: x W^T + b for a float, quantized or stacked weight; what every linear layer calls.

``product_into`` is the same written into (or added to) a given buffer: what the decode fast paths call.

A ``QuantWeight`` runs through the kernel named by its ``kernel`` (set by whoever measured the
candidates on the model's shapes: ``llmrun.profiler.quant_tuning``), else the first kernel of
``kernels.KERNELS`` that takes it: one in the activations' own dtype where there is one, else
``dequant``, the one that takes every shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmrun.model.quant.kernels import KERNELS, default_kernel
from llmrun.model.quant.weight import QuantWeight


class StackedWeight:
    """Weights of one input stacked along the output: ``parts`` (N_i, K), float tensors or ``QuantWeight``.

    What ``fuse_projections`` makes of q/k/v (or gate/up) whose formats differ: one product call
    runs each part and concatenates their outputs, (..., sum N_i).
    """

    def __init__(self, parts: list[torch.Tensor | QuantWeight]) -> None:
        self.parts = parts
        self.shape = (sum(p.shape[0] for p in parts), parts[0].shape[1])

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


Weight = torch.Tensor | QuantWeight | StackedWeight


def product(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ W^T (+ bias) -> (..., N) in x's dtype, for W (N, K) of any ``Weight`` kind."""
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight, bias)
    if isinstance(weight, StackedWeight):
        parts = [product(x, part) for part in weight.parts]
        y = torch.cat(parts, dim=-1)
    else:
        name = weight.kernel or default_kernel(weight, x.dtype)
        y = KERNELS[name].run(x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y.add_(bias)


def product_into(out: torch.Tensor, x: torch.Tensor, weight: Weight, bias: torch.Tensor | None, *, accumulate: bool):
    """out (B, N) = x (B, K) W^T + b, or out += x W^T + b (``accumulate``): ``product`` into a decode step's
    buffer, without the intermediate tensors where the weight's kernel writes into ``out`` itself."""
    if isinstance(weight, QuantWeight):
        kernel = KERNELS[weight.kernel or default_kernel(weight, x.dtype)]
        kernel.product_into(out, x, weight, accumulate=accumulate)
    elif accumulate:
        out.add_(product(x, weight))
    else:
        out.copy_(product(x, weight))
    if bias is not None:
        out.add_(bias)


def read_bytes(weight: Weight) -> int:
    """Bytes one product by ``weight`` reads: a float tensor's own; a ``QuantWeight``'s form in its kernel
    (``Kernel.read_bytes``: the kernel it runs through, else the one it would get for its dtype); a stack's sum."""
    if isinstance(weight, torch.Tensor):
        return weight.nbytes
    if isinstance(weight, StackedWeight):
        return sum(read_bytes(part) for part in weight.parts)
    return KERNELS[weight.kernel or default_kernel(weight, weight.dtype)].read_bytes(weight, weight.dtype)


def quant_weights(weight: Weight) -> list[QuantWeight]:
    """The ``QuantWeight`` parts of ``weight`` (itself, a stack's quantized parts, or none)."""
    if isinstance(weight, QuantWeight):
        return [weight]
    if isinstance(weight, StackedWeight):
        return [p for p in weight.parts if isinstance(p, QuantWeight)]
    return []
