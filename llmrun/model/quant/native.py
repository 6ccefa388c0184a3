"""llmrun's native kernels (``native.c``), called through ctypes once a build of them is bound.

The C source ships beside this module (``SOURCE``); ``llmrun.loading.native_kernels`` compiles it on
the machine that runs it and calls ``bind`` with the shared library. Until then (no compiler, a
failed build, ``LLMRUN_NATIVE=0``) ``bound()`` is False and their users fall back to PyTorch: the
quantized kernels ``native`` and ``native-tiled`` (``llmrun.model.quant.kernels``) take no weight,
the CPU decode kernel ``native`` (``llmrun.model.fastpath.gemv``) is no candidate, and the decode
step's norms and SiLU·mul run as PyTorch ops (``llmrun.model.fastpath.cpu``).

The quantized products read a ``QuantWeight``'s stored codes as they are (no copy, no packed
layout), with float32 activations, and its scales in their own form (``Scales``): a product
equals the dequantized float32 one up to float32 rounding.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import torch

from llmrun.model.quant.weight import INT4_OFFSET

SOURCE = Path(__file__).with_name("native.c")
BLOCK = 32  # columns per inner step of the C kernels: K and the group must be multiples of it

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    # x, codes, bits, scales, offsets, half, y, scratch, rows M, N, K, group, tiled, threads
    "llmrun_gemv": [_P, _P, _INT, _P, _P, _INT, _P, _P, _I64, _I64, _I64, _I64, _INT, _INT],
    # codes, bits, scales, offsets, half, out, first row, rows, K, group, threads
    "llmrun_dequant": [_P, _INT, _P, _P, _INT, _P, _I64, _I64, _I64, _I64, _INT],
    # x, w, y; rows M, N, K; accumulate, threads
    "llmrun_gemv_f32": [_P, _P, _P, _I64, _I64, _I64, _INT, _INT],
    # x, weight, out; rows M, D; eps
    "llmrun_rms_norm": [_P, _P, _P, _I64, _I64, ctypes.c_float],
    # gate, up, out; rows M, N; row strides of gate, up, out
    "llmrun_silu_mul": [_P, _P, _P, _I64, _I64, _I64, _I64, _I64],
    "llmrun_has_tiles": [],
}

_library: ctypes.CDLL | None = None


@dataclass
class Scales:
    """The kernels' scales (N, K/group) and, 4-bit, offsets (N, K/group): w = code * scale + offset.

    The offset is the stored zero - 8 scale (``QuantWeight``'s w = (code - 8) scale + zero). Both are
    float16 where every value is one exactly (GGUF's Q4_0, Q4_1 and Q8_0 keep theirs in float16), which
    halves their bytes per token; else float32.
    """

    scales: torch.Tensor
    offsets: torch.Tensor | None

    @classmethod
    def of(cls, scales: torch.Tensor, zeros: torch.Tensor | None) -> Scales:
        offsets = None if zeros is None else zeros - INT4_OFFSET * scales
        parts = [t for t in (scales, offsets) if t is not None]
        exact = all(torch.equal(t.half().float(), t) for t in parts)
        dtype = torch.float16 if exact else torch.float32
        return cls(*(None if t is None else t.to(dtype).contiguous() for t in (scales, offsets)))

    @property
    def half(self) -> bool:
        return self.scales.dtype == torch.float16

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.scales, self.offsets) if t is not None)

    def pointers(self) -> tuple[int, int | None, bool]:
        return self.scales.data_ptr(), None if self.offsets is None else self.offsets.data_ptr(), self.half


def bind(path: Path) -> None:
    """Use the compiled kernels of the shared library at ``path`` from now on (``OSError`` if it cannot load)."""
    global _library
    library = ctypes.CDLL(str(path))
    for name, arguments in _SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes, function.restype = arguments, None
    library.llmrun_has_tiles.restype = _INT
    _library = library


def unbind() -> None:
    """Stop offering the compiled kernels to new weights (``LLMRUN_NATIVE=0``, tests); a weight already set to
    one of them cannot multiply until they are bound again."""
    global _library
    _library = None


def bound() -> bool:
    """Whether compiled kernels are bound (``bind``)."""
    return _library is not None


def has_tiles() -> bool:
    """Whether the bound build multiplies four weight rows at a time where asked (``gemv(tiled=True)``)."""
    return _library is not None and bool(_library.llmrun_has_tiles())


def takes(bits: int, k: int, group: int) -> bool:
    """Whether the C kernels multiply a weight of ``bits``-bit codes, K columns and ``group`` columns per scale."""
    return bits in (4, 8) and k % BLOCK == 0 and group % BLOCK == 0


def gemv(x: torch.Tensor, codes: torch.Tensor, scales: Scales, *, tiled: bool = False) -> torch.Tensor:
    """x (M, K) float32 contiguous times the weight (N, K) of contiguous ``codes`` and ``scales`` -> (M, N) float32.

    Each weight row is read once per row of x: for few rows (decode); ``dequantize`` then a matrix
    product is the way for many. ``tiled``: four weight rows at a time, each block of x loaded once
    for them (``has_tiles``); which of the two is faster depends on the shape and the CPU.
    """
    m, k = x.shape
    n, bits = codes.shape[0], 8 if codes.dtype == torch.int8 else 4
    y = torch.empty(m, n, dtype=torch.float32)
    scratch = torch.empty(m * (k + scales.scales.shape[1]) if bits == 4 else 1, dtype=torch.float32)
    group = k // scales.scales.shape[1]
    _library.llmrun_gemv(
        x.data_ptr(), codes.data_ptr(), bits, *scales.pointers(), y.data_ptr(), scratch.data_ptr(),
        m, n, k, group, tiled, torch.get_num_threads(),
    )  # fmt: skip
    return y


def takes_float(n: int, k: int) -> bool:
    """Whether the bound build multiplies a float32 weight (N, K) (``gemv_float``): AVX2 builds, N a multiple
    of 4 and K of 16."""
    return has_tiles() and n % 4 == 0 and k % 16 == 0


def gemv_float(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, *, accumulate: bool) -> None:
    """out (M, N) = x (M, K) W^T, or out += x W^T, for float32 contiguous tensors and W (N, K) (``takes_float``)."""
    m, k = x.shape
    _library.llmrun_gemv_f32(
        x.data_ptr(), w.data_ptr(), out.data_ptr(), m, w.shape[0], k, accumulate, torch.get_num_threads()
    )


def rms_norm(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """out (M, D) = x / sqrt(mean(x^2) + eps) * weight, for contiguous float32 x and out (one thread)."""
    m, d = x.shape
    _library.llmrun_rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), m, d, eps)


def silu_mul(out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> None:
    """out (M, N) = silu(gate) * up, for float32 tensors whose rows are contiguous (one thread)."""
    m, n = gate.shape
    _library.llmrun_silu_mul(
        gate.data_ptr(), up.data_ptr(), out.data_ptr(), m, n, gate.stride(0), up.stride(0), out.stride(0)
    )


def dequantize(codes: torch.Tensor, scales: Scales, first: int, rows: int, out: torch.Tensor) -> torch.Tensor:
    """Rows first .. first + rows - 1 of the weight, dequantized into ``out`` (at least rows x K float32)."""
    k = out.shape[-1]
    bits, group, view = 8 if codes.dtype == torch.int8 else 4, k // scales.scales.shape[1], out[:rows]
    _library.llmrun_dequant(
        codes.data_ptr(), bits, *scales.pointers(), view.data_ptr(), first, rows, k, group, torch.get_num_threads()
    )
    return view
