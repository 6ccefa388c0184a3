"""``QuantWeight``: a linear layer's weight (N, K) as integer codes with a scale (and zero) per group.

The stored form, the same in memory and in a checkpoint (never a device's packed layout):

* 8-bit: ``codes`` int8 (N, K); w = codes · scale.
* 4-bit: ``codes`` uint8 (N, K/2), two codes 0..15 per byte, column 2j in the high nibble and
  column 2j+1 in the low one; w = (code - 8) · scale + zero.
* ``scales`` float32 (N, K / group) and, 4-bit only, ``zeros`` float32 (N, K / group): group g of
  row n covers columns g·group .. (g+1)·group - 1. A group of K is one scale per row (per channel).

Kernels may keep other forms derived from these (``prepared``), built on the device that runs them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmrun.errors import LlmrunError

CODE_DTYPES = {8: torch.int8, 4: torch.uint8}
INT4_OFFSET = 8  # a 4-bit code q means (q - 8) · scale + zero


class QuantWeight:
    """Codes, scales and zeros of one (N, K) weight used with activations in ``dtype``.

    ``kernel`` names the product that runs it (``llmrun.model.quant.kernels``; None: the default).
    """

    def __init__(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        name: str = "weight",
    ) -> None:
        self.dtype = dtype  # the activations' dtype: what products and embedding rows come out in
        self.bits = 4 if codes.dtype == torch.uint8 else 8
        self.codes, self.scales, self.zeros = codes, scales, zeros
        check_quant_tensors(codes, scales, zeros, name)
        n, packed_k = codes.shape
        self.shape = (n, packed_k * (2 if self.bits == 4 else 1))
        self.group = self.shape[1] // scales.shape[1]
        self._stored_bytes = sum(t.nbytes for t in (codes, scales, zeros) if t is not None)
        self.codes_bytes = codes.nbytes  # of the stored codes (kept after ``drop_codes``)
        self._device = scales.device
        self.kernel: str | None = None
        self.prepared: dict[str, object] = {}  # kernel name -> the form that kernel multiplies by
        self.keep_codes = False  # set where the stored codes are read themselves (an embedding's rows)
        # Where the codes of some rows come from once the stored ones are dropped (a kernel's own copy
        # that gives rows back): rows (R,) -> their codes (R, K) as ``unpacked_codes`` returns them.
        self.row_codes: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.parent: QuantWeight | None = None  # the weight this one is a row view of (``rows``)
        self.views: list[QuantWeight] = []  # the row views made of this one (``rows``)
        # Where the stored tensors are pages of a mapped checkpoint: drops this weight's pages from memory
        # (those still used are read back on their next access), called when a stored tensor is dropped.
        self.release_mapped: Callable[[], None] = lambda: None

    @property
    def format(self) -> str:
        """``int8`` (per channel), ``int8:G`` (G columns per scale, e.g. GGUF Q8_0), ``int4:G``."""
        if self.bits == 8 and self.group == self.shape[1]:
            return "int8"
        return f"int{self.bits}:{self.group}"

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def nbytes(self) -> int:
        """Bytes of the stored form: codes, scales and zeros (what a checkpoint holds; kept after ``drop_codes``)."""
        return self._stored_bytes

    def element_size(self) -> float:
        """Stored bytes per weight element: codes plus this weight's share of scales and zeros."""
        return self.nbytes / (self.shape[0] * self.shape[1])

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored form by checkpoint suffix: ``""`` (codes), ``"_scale"``, ``"_zero"`` (4-bit only)."""
        out = {"": self.codes, "_scale": self.scales}
        if self.zeros is not None:
            out["_zero"] = self.zeros
        return out

    def drop_codes(self) -> None:
        """Free the stored codes once a kernel holds its own copy: only that kernel (and its variants for
        other dtypes) can multiply by this weight from now on, and it can no longer be dequantized. Its row
        views (``rows``) drop theirs too, and their scales: the memory is freed once none holds it."""
        self.codes = None
        for view in self.views:
            view.codes = view.scales = view.zeros = None
        self.release_mapped()

    def drop_scales(self) -> None:
        """Free the stored scales and zeros (and the row views' of them) once a kernel holds its own copies:
        only the forms already in ``prepared`` can multiply by this weight from now on."""
        self.scales = self.zeros = None
        for view in self.views:
            view.scales = view.zeros = None
        self.release_mapped()

    def to(self, device: torch.device) -> QuantWeight:
        """This weight's stored form on ``device`` (itself if it is there already)."""
        if self.device == device:
            return self
        zeros = self.zeros.to(device) if self.zeros is not None else None
        return QuantWeight(self.codes.to(device), self.scales.to(device), zeros, dtype=self.dtype)

    def unpacked_codes(self, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """The codes of ``rows`` (all by default) as (R, K): int8 for 8-bit, uint8 0..15 for 4-bit."""
        if self.codes is None:
            if self.row_codes is not None and isinstance(rows, torch.Tensor):
                return self.row_codes(rows)
            raise RuntimeError("this weight's stored codes were dropped (QuantWeight.drop_codes)")
        codes = self.codes if rows is None else self.codes[rows]
        if self.bits == 8:
            return codes
        out = torch.empty(*codes.shape[:-1], 2 * codes.shape[-1], dtype=torch.uint8, device=codes.device)
        torch.bitwise_right_shift(codes, 4, out=out[..., 0::2])
        torch.bitwise_and(codes, 15, out=out[..., 1::2])
        return out

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """The weight's ``rows`` (all by default) as (R, K) in ``dtype``, computed in float32."""
        if self.scales is None:
            raise RuntimeError("this weight's stored scales were dropped (QuantWeight.drop_scales)")
        codes = self.unpacked_codes(rows).float()
        scales = self.scales if rows is None else self.scales[rows]
        r, k = codes.shape
        grouped = codes.view(r, k // self.group, self.group)
        if self.bits == 4:
            zeros = self.zeros if rows is None else self.zeros[rows]
            grouped = (grouped - INT4_OFFSET) * scales.unsqueeze(-1) + zeros.unsqueeze(-1)
        else:
            grouped = grouped * scales.unsqueeze(-1)
        return grouped.view(r, k).to(dtype)

    def rows(self, start: int, length: int) -> QuantWeight:
        """Rows start..start+length-1 as a ``QuantWeight`` of views (no copy)."""
        span = slice(start, start + length)
        zeros = self.zeros[span] if self.zeros is not None else None
        view = QuantWeight(self.codes[span], self.scales[span], zeros, dtype=self.dtype)
        view.parent = self
        self.views.append(view)
        return view


def concat_rows(weights: list[QuantWeight]) -> QuantWeight | None:
    """One weight holding ``weights``' rows in order (contiguous codes, scales and zeros), or None where their
    formats differ."""
    first = weights[0]
    if any(w.format != first.format or w.shape[1] != first.shape[1] for w in weights):
        return None
    zeros = None if first.zeros is None else torch.cat([w.zeros for w in weights])
    codes, scales = torch.cat([w.codes for w in weights]), torch.cat([w.scales for w in weights])
    return QuantWeight(codes, scales, zeros, dtype=first.dtype)


def check_quant_tensors(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, name: str) -> None:
    """Refuse codes, scales and zeros that do not make one weight (``LlmrunError`` naming ``name``)."""
    if codes.dtype not in CODE_DTYPES.values() or codes.dim() != 2:
        raise LlmrunError(
            f"quantized tensor {name!r}: codes must be 2-d int8 or uint8, got {codes.dtype} {list(codes.shape)}"
        )
    four_bit = codes.dtype == torch.uint8
    k = codes.shape[1] * (2 if four_bit else 1)
    groups = scales.shape[-1] if scales.dim() == 2 else 0
    if (
        scales.dtype != torch.float32
        or scales.dim() != 2
        or scales.shape[0] != codes.shape[0]
        or not groups
        or k % groups
    ):
        raise LlmrunError(
            f"quantized tensor {name!r}: scales {scales.dtype} {list(scales.shape)} do not match codes "
            f"{list(codes.shape)} (float32 ({codes.shape[0]}, K/group) expected); the checkpoint is corrupt"
        )
    if four_bit != (zeros is not None):
        raise LlmrunError(f"quantized tensor {name!r}: 4-bit codes need zeros, 8-bit codes take none")
    if zeros is not None and (zeros.dtype != torch.float32 or zeros.shape != scales.shape):
        raise LlmrunError(
            f"quantized tensor {name!r}: zeros {zeros.dtype} {list(zeros.shape)} do not match scales "
            f"{list(scales.shape)}"
        )
