"""The modules a model uses for quantized weights, and quantizing a float model's weights in place.

``QuantLinear`` stands for ``nn.Linear`` and ``QuantEmbedding`` for ``nn.Embedding`` where the
weight is a ``QuantWeight``; a tied lm_head is a ``QuantLinear`` over the embedding's own
``QuantWeight``. The weight is a plain attribute, not a parameter: ``parameters()`` lists only the
float tensors (norms, biases, unquantized matrices).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import torch
from torch import nn

from llmrun.model.fused import FUSED_PROJECTIONS
from llmrun.model.quant.kernels import KERNELS
from llmrun.model.quant.product import StackedWeight, Weight, default_kernel, product, quant_weights
from llmrun.model.quant.quantize import QuantSpec
from llmrun.model.quant.weight import QuantWeight, concat_rows


class QuantLinear(nn.Module):
    """x (..., K) -> x W^T + b (..., N) for a quantized (or stacked) weight W (N, K), through ``product``."""

    def __init__(self, weight: QuantWeight | StackedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return product(x, self.weight, self.bias)


class QuantEmbedding(nn.Module):
    """token ids (...) int64 -> rows (..., d) in the weight's dtype: only the rows looked up are dequantized."""

    def __init__(self, weight: QuantWeight) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.weight = weight
        weight.keep_codes = True  # its rows are looked up in the stored codes (or a kernel's that serves rows)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight.dequantize(self.weight.dtype, ids.reshape(-1))
        return rows.view(*ids.shape, self.embedding_dim)

    def row_bytes(self) -> int:
        """Bytes one lookup reads: a row of codes and its float32 scales (and zeros)."""
        return self.weight.nbytes // self.num_embeddings


def is_quantized(model: nn.Module) -> bool:
    """Whether any weight of ``model`` is quantized."""
    return any(True for _ in quantized_weights(model))


def quantized_weights(model: nn.Module) -> Iterator[tuple[str, QuantWeight]]:
    """(module name, weight) of every ``QuantWeight`` a module of ``model`` holds, the fused ones included.

    A weight two modules share (a tied lm_head) is listed once.
    """
    seen: set[int] = set()
    views: set[str] = set()  # the projections whose weights are row views of a fused one
    for name, module in model.named_modules():
        if name in views:
            continue
        for _, attr, _, parts in FUSED_PROJECTIONS:
            if isinstance(getattr(module, attr, None), QuantWeight):
                views.update(f"{name}.{part}" for part in parts)
        for attr in ("weight", *(fused for _, fused, _, _ in FUSED_PROJECTIONS)):
            for weight in quant_weights(getattr(module, attr, None)):
                if id(weight) not in seen:
                    seen.add(id(weight))
                    yield (f"{name}.{attr}" if attr != "weight" else name), weight


def held_weights(model: nn.Module) -> tuple[int, int]:
    """(weight elements, bytes) of ``model`` as it holds them: every float parameter, and every quantized
    weight once (a tied or fused one too) at its stored size (codes, scales and zeros: ``QuantWeight.nbytes``)."""
    quantized = [weight for _, weight in quantized_weights(model)]
    floats = {id(p): p for p in model.parameters()}.values()
    elements = sum(p.numel() for p in floats) + sum(w.shape[0] * w.shape[1] for w in quantized)
    return elements, sum(p.nbytes for p in floats) + sum(w.nbytes for w in quantized)


def product_weights(model: nn.Module) -> Iterator[QuantWeight]:
    """The quantized weights some product multiplies by: ``quantized_weights``'s but an embedding only looked up in."""
    linear = {id(w) for m in model.modules() if isinstance(m, QuantLinear) for w in quant_weights(m.weight)}
    lookup = {id(m.weight) for m in model.modules() if isinstance(m, QuantEmbedding)} - linear
    return (weight for _, weight in quantized_weights(model) if id(weight) not in lookup)


def prepare_model(model: nn.Module, done: Callable[[QuantWeight], None] = lambda weight: None) -> None:
    """Make every product weight's kernel form now (packing it for this device), not at the first product;
    a weight without a kernel gets the default one (``default_kernel``), so no product call looks it up.

    Where that kernel keeps its own copy of the codes, the stored codes are dropped (unless an
    embedding reads them and the kernel cannot serve its rows), with those of the row views made of
    them (``QuantWeight.drop_codes``): one copy of the codes in memory. ``done(weight)`` is called after
    each weight (the loader frees memory there).
    """
    for weight in product_weights(model):
        weight.kernel = weight.kernel or default_kernel(weight, weight.dtype)
        kernel = KERNELS[weight.kernel]
        kernel.form(weight, kernel.compute or weight.dtype)
        if kernel.codes_key is not None and (kernel.serves_rows or not weight.keep_codes):
            if kernel.serves_rows:
                weight.row_codes = functools.partial(kernel.row_codes, weight)
            weight.drop_codes()
        done(weight)


def settle(weight: QuantWeight) -> None:
    """Free the stored scales and zeros of a weight whose kernel now holds its own scales (and its own codes,
    or reads the stored ones), but not an embedding's, whose rows are looked up with them: only that
    kernel's form multiplies by it from now on.

    For the end of a kernel choice (``llmrun.profiler.quant_tuning``): no other candidate can be timed after it.
    """
    kernel = KERNELS[weight.kernel] if weight.kernel is not None else None
    if kernel is None or not kernel.own_scales or weight.keep_codes:
        return
    # a kernel with its own codes multiplies by its own form alone once the stored codes are gone; one
    # that reads the stored codes (native) needs its own scales only
    if weight.codes is None or kernel.codes_key is None:
        weight.drop_scales()


def quantize_model(model: nn.Module, spec: QuantSpec, advance: Callable[[int], None] = lambda n: None) -> None:
    """Quantize every linear weight and the token embedding of a loaded float ``Transformer`` in place.

    The fused q/k/v and gate/up matrices are quantized once each and their projections' modules
    hold row views of them; a matrix whose K the format cannot take (int4: K not a multiple of the
    group) stays float. ``advance(n)`` is called after each matrix with its float bytes.
    """
    decoder = model.model
    for block in decoder.layers:
        for owner, attr, _, parts in FUSED_PROJECTIONS:
            _quantize_fused(getattr(block, owner), attr, parts, spec, advance)
        for owner, name in ((block.self_attn, "o_proj"), (block.mlp, "down_proj")):
            _quantize_linear(owner, name, spec, advance)
    embed = decoder.embed_tokens.weight
    tied = model.lm_head.weight is embed
    if spec.takes(embed.shape[1]):
        advance(embed.nbytes)
        decoder.embed_tokens = QuantEmbedding(_quantized(embed, spec))
    if tied:
        model.tie_weights()
    else:
        _quantize_linear(model, "lm_head", spec, advance)


def _quantized(weight: torch.Tensor, spec: QuantSpec) -> QuantWeight:
    qweight = spec.quantize(weight)
    qweight.dtype = weight.dtype
    return qweight


def _quantize_linear(owner: nn.Module, name: str, spec: QuantSpec, advance: Callable[[int], None]) -> None:
    linear = getattr(owner, name)
    if isinstance(linear, nn.Linear) and spec.takes(linear.in_features):
        advance(linear.weight.nbytes)
        setattr(owner, name, QuantLinear(_quantized(linear.weight, spec), linear.bias))


def _quantize_fused(
    owner: nn.Module, attr: str, parts: tuple[str, ...], spec: QuantSpec, advance: Callable[[int], None]
) -> None:
    fused: Weight | None = getattr(owner, attr)
    if not isinstance(fused, torch.Tensor) or not spec.takes(fused.shape[1]):
        return
    advance(fused.nbytes)
    qweight = _quantized(fused, spec)
    setattr(owner, attr, qweight)
    row = 0
    for name in parts:
        linear = getattr(owner, name)
        setattr(owner, name, QuantLinear(qweight.rows(row, linear.out_features), linear.bias))
        row += linear.out_features


def fuse_quantized(linears: list[nn.Module]) -> tuple[QuantLinear, list[nn.Module]]:
    """One ``QuantLinear`` over ``linears``' rows in order, and the module each part becomes.

    Where all the weights are quantized in one format, the fused weight concatenates their codes,
    scales and zeros, and each part becomes a ``QuantLinear`` of row views of it (one copy in all);
    otherwise it is a ``StackedWeight`` of the weights as they are and the parts stay as they are.
    """
    weights = [linear.weight for linear in linears]
    fused = concat_rows(weights) if all(isinstance(w, QuantWeight) for w in weights) else None
    biases = [linear.bias for linear in linears]
    whole = QuantLinear(fused or StackedWeight(weights), torch.cat(biases) if biases[0] is not None else None)
    if fused is None:
        return whole, list(linears)
    parts, row = [], 0
    for linear in linears:
        span = slice(row, row + linear.out_features)
        bias = whole.bias[span] if whole.bias is not None else None
        parts.append(QuantLinear(fused.rows(row, linear.out_features), bias))
        row = span.stop
    return whole, parts
