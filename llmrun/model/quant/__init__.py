"""Quantized weights: integer codes with scales (and zeros) per group of columns, multiplied without a float copy.

* ``weight``: ``QuantWeight``, the stored form (int8 codes, or 4-bit codes two per byte; float32
  scales and zeros per group) and its dequantization; the checkpoint layout is the same.
* ``quantize``: ``--quant``'s formats (``QuantSpec``, ``parse_quant``), int8 per channel and int4
  group-wise from float weights.
* ``kernels``: the products x W^T per device, shape and dtype (llmrun's native C kernels in ``native``,
  PyTorch's int8/int4 weight-only kernels, and ``dequant``, the reference that takes every shape).
* ``product``: ``product(x, weight, bias)``, the one call every linear layer makes, and ``product_into``,
  the same into a given buffer, which the decode fast paths call.
* ``modules``: ``QuantLinear``, ``QuantEmbedding``, quantizing a loaded model in place, fusing
  quantized projections.
"""

from llmrun.model.quant.kernels import KERNELS, candidates, predicted_read_bytes
from llmrun.model.quant.modules import (
    QuantEmbedding,
    QuantLinear,
    fuse_quantized,
    held_weights,
    is_quantized,
    prepare_model,
    product_weights,
    quantize_model,
    quantized_weights,
    settle,
)
from llmrun.model.quant.product import StackedWeight, default_kernel, product, read_bytes
from llmrun.model.quant.quantize import (
    AUTO_QUANT,
    INT4_GROUPS,
    NO_QUANT,
    QuantSpec,
    parse_quant,
    quantize_int4,
    quantize_int8,
)
from llmrun.model.quant.weight import QuantWeight, check_quant_tensors

__all__ = [
    "AUTO_QUANT",
    "INT4_GROUPS",
    "KERNELS",
    "NO_QUANT",
    "QuantEmbedding",
    "QuantLinear",
    "QuantSpec",
    "QuantWeight",
    "StackedWeight",
    "candidates",
    "check_quant_tensors",
    "default_kernel",
    "fuse_quantized",
    "held_weights",
    "is_quantized",
    "parse_quant",
    "predicted_read_bytes",
    "prepare_model",
    "product",
    "product_weights",
    "quantize_int4",
    "quantize_int8",
    "quantize_model",
    "quantized_weights",
    "read_bytes",
    "settle",
]
