"""Quantizing float weights: ``--quant``'s formats, int8 per channel and int4 group-wise.

Round to nearest: int8 keeps amax/127 per row (codes -127..127), int4 the group's min and
(max - min)/15 (codes 0..15), so every dequantized element is within half a step (its group's
scale / 2) of the float weight, up to float32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmrun.errors import LlmrunError
from llmrun.model.quant.weight import INT4_OFFSET, QuantWeight

INT4_GROUPS = (32, 64, 128, 256)  # the group sizes the int4 kernels take
DEFAULT_INT4_GROUP = 32
ROWS_PER_CHUNK = 4096  # rows quantized at once, so that the float32 scratch stays small for any matrix


@dataclass(frozen=True)
class QuantSpec:
    """What ``--quant`` asks for: ``kind`` ``auto`` (the checkpoint's own form), ``none`` (float), ``int8``
    or ``int4``; ``group`` columns per int4 scale."""

    kind: str
    group: int = 0

    @property
    def name(self) -> str:
        """``none``, ``int8`` or ``int4:GROUP``."""
        return f"int4:{self.group}" if self.kind == "int4" else self.kind

    def quantize(self, weight: torch.Tensor) -> QuantWeight:
        """A float weight (N, K) in this format (``kind`` must not be ``none``)."""
        return quantize_int8(weight) if self.kind == "int8" else quantize_int4(weight, self.group)

    def takes(self, k: int) -> bool:
        """Whether a weight with K columns can be stored in this format (int4: K a multiple of the group)."""
        return self.kind == "int8" or (self.kind == "int4" and k % self.group == 0)


NO_QUANT = QuantSpec("none")
AUTO_QUANT = QuantSpec("auto")


def parse_quant(text: str | None) -> QuantSpec:
    """``auto`` (also None), ``none``, ``int8``, ``int4`` or ``int4:GROUP`` -> ``QuantSpec`` (GROUP: ``INT4_GROUPS``).

    Raises:
        LlmrunError: anything else.
    """
    text = (text or "auto").strip().lower()
    kind, _, group = text.partition(":")
    if kind in ("auto", "none", "int8") and not group:
        return QuantSpec(kind)
    if kind == "int4":
        if not group:
            return QuantSpec("int4", DEFAULT_INT4_GROUP)
        if group.isdigit() and int(group) in INT4_GROUPS:
            return QuantSpec("int4", int(group))
        raise LlmrunError(
            f"--quant {text}: the int4 kernels take groups of {', '.join(map(str, INT4_GROUPS))} columns, "
            f"e.g. --quant int4:{DEFAULT_INT4_GROUP}"
        )
    raise LlmrunError(f"--quant {text!r} is not a format: use auto, none, int8, int4 or int4:GROUP (e.g. int4:64)")


def quantize_int8(weight: torch.Tensor) -> QuantWeight:
    """(N, K) float -> int8 codes with one float32 scale per row (amax / 127)."""
    codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], 1, dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], ROWS_PER_CHUNK):
        w = weight[start : start + ROWS_PER_CHUNK].float()
        scale = w.abs().amax(dim=1, keepdim=True).div_(127).clamp_(min=torch.finfo(torch.float32).tiny)
        scales[start : start + ROWS_PER_CHUNK] = scale
        codes[start : start + ROWS_PER_CHUNK] = (w / scale).round_().clamp_(-127, 127).to(torch.int8)
    return QuantWeight(codes, scales)


def quantize_int4(weight: torch.Tensor, group: int) -> QuantWeight:
    """(N, K) float, K a multiple of ``group`` -> 4-bit codes, float32 scale and zero per ``group`` columns."""
    n, k = weight.shape
    if group not in INT4_GROUPS or k % group:
        raise LlmrunError(f"int4 with groups of {group} columns cannot store a weight of {k} columns")
    codes = torch.empty(n, k // 2, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(n, k // group, dtype=torch.float32, device=weight.device)
    zeros = torch.empty_like(scales)
    for start in range(0, n, ROWS_PER_CHUNK):
        span = slice(start, start + ROWS_PER_CHUNK)
        w = weight[span].float().view(-1, k // group, group)
        low, high = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
        scale = (high - low).div_(15)
        q = torch.where(scale > 0, (w - low) / scale.clamp(min=torch.finfo(torch.float32).tiny), 0)
        q = q.round_().clamp_(0, 15).to(torch.uint8).view(-1, k)
        codes[span] = (q[:, 0::2] << 4) | q[:, 1::2]
        scales[span] = scale.squeeze(-1)
        zeros[span] = (low + INT4_OFFSET * scale).squeeze(-1)
    return QuantWeight(codes, scales, zeros)
