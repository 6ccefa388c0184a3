"""llmrun's native kernels (``native.c``), called through ctypes once a build of them is bound.

The C source ships beside this module (``SOURCE``); ``llmrun.loading.native_kernels`` compiles it on
the machine that runs it and calls ``bind`` with the shared library. Until then (no compiler, a
failed build, ``LLMRUN_NATIVE=0``) ``bound()`` is False and their users fall back to PyTorch: the
quantized kernels ``native`` and ``native-tiled`` (``llmrun.model.quant.kernels``) take no weight,
the CPU decode kernel ``native`` (``llmrun.model.fastpath.gemv``) is no candidate, and the decode
step's norms and SiLU·mul run as PyTorch ops (``llmrun.model.fastpath.cpu``).

The quantized products read a ``QuantWeight``'s stored codes as they are (no copy, no packed
layout), with float32 activations, and its scales in their own form (``Scales``), both held by an
``Operand``: a product equals the dequantized float32 one up to float32 rounding, or, in the
16-bit form (``x16``), up to the rounding of x to 2^-16 of each 32 columns' largest magnitude.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from llmrun.model.quant.weight import INT4_OFFSET

SOURCE = Path(__file__).with_name("native.c")
BLOCK = 32  # columns per inner step of the C kernels: K and the group must be multiples of it

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


class _OperandArgs(ctypes.Structure):
    """``native.c``'s ``llmrun_operand``: one weight's pointers, shape and form of product."""

    _fields_ = [
        ("codes", _P), ("scales", _P), ("offsets", _P), ("n", _I64), ("k", _I64), ("group", _I64),
        ("bits", ctypes.c_int32), ("half", ctypes.c_int32), ("tiled", ctypes.c_int32), ("x16", ctypes.c_int32),
    ]  # fmt: skip


_SIGNATURES = {
    # x, operand, y, row stride of y, scratch, rows M, accumulate, threads
    "llmrun_gemv": [_P, _P, _P, _I64, _P, _I64, _INT, _INT],
    # operand, out, first row, rows, threads
    "llmrun_dequant": [_P, _P, _I64, _I64, _INT],
    # x, w, y; rows M, N, K; accumulate, threads
    "llmrun_gemv_f32": [_P, _P, _P, _I64, _I64, _I64, _INT, _INT],
    # x, weight, out; rows M, D; eps
    "llmrun_rms_norm": [_P, _P, _P, _I64, _I64, ctypes.c_float],
    # gate, up, out; rows M, N; row strides of gate, up, out
    "llmrun_silu_mul": [_P, _P, _P, _I64, _I64, _I64, _I64, _I64],
    # attention (``Attention``)
    "llmrun_rope": [_P],
    # attention, position, first and end key, threads
    "llmrun_attend": [_P, _I64, _I64, _I64, _INT],
    # layer, position, first and end key, attention threads, threads
    "llmrun_decode_layer": [_P, _I64, _I64, _I64, _INT, _INT],
    "llmrun_vectorized": [],
}

_library: ctypes.CDLL | None = None
_scratch = threading.local()  # each thread's float32 scratch for ``gemv`` (the C code writes it unlocked)


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


class Operand:
    """A quantized weight (N, K) as the C kernels multiply it: its contiguous stored ``codes`` (uint8 (N, K/2)
    4-bit, int8 (N, K) 8-bit), its ``scales`` and the form of product (``tiled``, ``x16``: see ``gemv``).

    Holds the tensors it points at (they live as long as it does) and their pointers, shape and form in
    one C struct, so that a product passes a single pointer for all of them.
    """

    def __init__(self, codes: torch.Tensor, scales: Scales, *, tiled: bool = False, x16: bool = False) -> None:
        self.codes, self.scales = codes, scales
        n, groups = codes.shape[0], scales.scales.shape[1]
        self.bits = 8 if codes.dtype == torch.int8 else 4
        self.shape = (n, codes.shape[1] * 8 // self.bits)
        offsets = scales.offsets.data_ptr() if scales.offsets is not None else None
        self.args = _OperandArgs(
            codes.data_ptr(), scales.scales.data_ptr(), offsets, n, self.shape[1], self.shape[1] // groups,
            self.bits, scales.half, tiled, x16,
        )  # fmt: skip
        self.pointer = ctypes.addressof(self.args)

    @property
    def nbytes(self) -> int:
        """Bytes of its scales and offsets (the codes are the weight's own)."""
        return self.scales.nbytes


class _AttentionArgs(ctypes.Structure):
    """``native.c``'s ``llmrun_attention``: one layer's decode attention buffers and shapes."""

    _fields_ = [
        ("qkv", _P), ("qkv_row", _I64), ("cos", _P), ("sin", _P), ("qk", _P), ("k", _P), ("v", _P), ("o", _P),
        ("scores", _P), ("batch", _I64), ("heads", _I64), ("kv_heads", _I64), ("d", _I64), ("s_max", _I64),
    ]  # fmt: skip


class Attention:
    """One layer of a float32 decode step from its q/k/v product to attention's output, in two native calls.

    ``rope()``: ``qk`` (B, H+Hkv, D) = RoPE of ``qkv``'s q and k heads with this step's ``cos``, ``sin``
    (H+Hkv, D; q's rows carry 1/sqrt(D), the sine is signed for rotate_half). ``attend(pos, start, end,
    threads)``: the rotated k and the v at position ``pos`` of the cache ``k``, ``v`` (B, Hkv, S_max, D),
    then ``o`` (B, H·D) = softmax(q K^T) V over keys start..end-1. All float32 and contiguous but
    ``qkv`` (B, (H+2Hkv)·D), whose rows may be further apart; the tensors live as long as this does.
    """

    def __init__(self, qkv, cos, sin, qk, k, v, o, *, threads: int) -> None:
        self.tensors = (qkv, cos, sin, qk, k, v, o)
        batch, kv_heads, s_max, d = k.shape
        self.threads = max(1, threads)
        self.scores = torch.empty(self.threads * s_max, dtype=torch.float32)
        self.args = _AttentionArgs(
            qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), qk.data_ptr(), k.data_ptr(), v.data_ptr(),
            o.data_ptr(), self.scores.data_ptr(), batch, qk.shape[1] - kv_heads, kv_heads, d, s_max,
        )  # fmt: skip
        self.pointer = ctypes.addressof(self.args)

    def rope(self) -> None:
        _library.llmrun_rope(self.pointer)

    def attend(self, pos: int, start: int, end: int, threads: int) -> None:
        _library.llmrun_attend(self.pointer, pos, start, end, self.usable_threads(threads))

    def usable_threads(self, threads: int) -> int:
        """At most the threads the scores scratch was made for (a count raised later gets no more)."""
        return min(threads, self.threads)


class _ProductArgs(ctypes.Structure):
    """``native.c``'s ``llmrun_product``: a quantized operand, or a float32 weight (N, K)."""

    _fields_ = [("quant", _P), ("dense", _P), ("n", _I64), ("k", _I64)]


class _LayerArgs(ctypes.Structure):
    """``native.c``'s ``llmrun_layer``: one block of a float32 decode step, every product native."""

    _fields_ = [
        ("x", _P), ("h", _P), ("qkv", _P), ("gate_up", _P), ("act", _P), ("scratch", _P),
        ("attn_norm", _P), ("mlp_norm", _P), ("eps", ctypes.c_float), ("batch", _I64), ("d", _I64), ("f", _I64),
        ("qkv_proj", _ProductArgs), ("o_proj", _ProductArgs), ("gate_up_proj", _ProductArgs),
        ("down_proj", _ProductArgs), ("attention", _P),
    ]  # fmt: skip


Product = Operand | torch.Tensor  # a quantized operand, or a float32 weight (N, K) that ``takes_float``


class Layer:
    """One block of a float32 decode step in one native call (``run``): the ops of
    ``llmrun.model.fastpath.step.FastDecoder._layers`` in their order, from ``x`` (B, d) back into it.

    ``products`` are q/k/v, o, gate/up and down, each an ``Operand`` or a float32 weight (N, K)
    contiguous (``takes_float``); ``attention`` the block's ``Attention``, whose ``qkv`` and ``o`` the
    q/k/v product writes and the o product reads; ``gate_up`` (B, 2f) and ``act`` (B, f) float32
    contiguous. The tensors live as long as this does.
    """

    def __init__(self, x, h, gate_up, act, attn_norm, mlp_norm, eps: float, products, attention: Attention) -> None:
        batch, d = x.shape
        f = act.shape[1]
        widest = max(d, f)
        self.scratch = torch.empty(batch * (3 * widest // 2 + 2 * widest // BLOCK), dtype=torch.float32)
        self.tensors = (x, h, gate_up, act, attn_norm, mlp_norm, products)
        self.attention = attention
        self.args = _LayerArgs(
            x.data_ptr(), h.data_ptr(), attention.tensors[0].data_ptr(), gate_up.data_ptr(), act.data_ptr(),
            self.scratch.data_ptr(), attn_norm.data_ptr(), mlp_norm.data_ptr(), eps, batch, d, f,
            *(_product_args(p) for p in products), attention.pointer,
        )  # fmt: skip
        self.pointer = ctypes.addressof(self.args)

    def run(self, pos: int, start: int, end: int, attention_threads: int, threads: int) -> None:
        """The block at position ``pos``, attending to keys start..end-1 on ``attention_threads`` (at most the
        ``Attention``'s scratch allows), its products on ``threads``."""
        attention_threads = self.attention.usable_threads(attention_threads)
        _library.llmrun_decode_layer(self.pointer, pos, start, end, attention_threads, threads)


def _product_args(product: Product) -> _ProductArgs:
    if isinstance(product, Operand):
        return _ProductArgs(product.pointer, None, *product.shape)
    return _ProductArgs(None, product.data_ptr(), *product.shape)


def bind(path: Path) -> None:
    """Use the compiled kernels of the shared library at ``path`` from now on (``OSError`` if it cannot load)."""
    global _library
    library = ctypes.CDLL(str(path))
    for name, arguments in _SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes, function.restype = arguments, None
    library.llmrun_vectorized.restype = _INT
    _library = library


def unbind() -> None:
    """Stop offering the compiled kernels to new weights (``LLMRUN_NATIVE=0``, tests); a weight already set to
    one of them cannot multiply until they are bound again."""
    global _library
    _library = None


def bound() -> bool:
    """Whether compiled kernels are bound (``bind``)."""
    return _library is not None


def vectorized() -> bool:
    """Whether the bound build has the AVX2 forms: ``gemv``'s ``tiled`` and ``x16``, and ``gemv_float``."""
    return _library is not None and bool(_library.llmrun_vectorized())


def takes(bits: int, k: int, group: int) -> bool:
    """Whether the C kernels multiply a weight of ``bits``-bit codes, K columns and ``group`` columns per scale."""
    return bits in (4, 8) and k % BLOCK == 0 and group % BLOCK == 0


def gemv(out: torch.Tensor, x: torch.Tensor, operand: Operand, *, accumulate: bool = False) -> None:
    """out (M, N) = x (M, K) W^T, or out += x W^T, for x float32 contiguous and out float32 with contiguous rows.

    Each weight row is read once per row of x: for few rows (decode); ``dequantize`` then a matrix
    product is the way for many. The operand's form: ``tiled``, four weight rows at a time, each block
    of x loaded once for them; ``x16``, x rounded to the 16-bit form (``native.c``: int16 codes times a
    step per 32 columns, an error of at most 2^-16 of the block's largest magnitude) and summed by
    integer multiply-adds. Both need ``vectorized``; which form is fastest depends on the shape and the CPU.
    """
    m, k = x.shape
    size = m * (3 * k // 2 + k // BLOCK + k // operand.args.group)
    scratch = getattr(_scratch, "tensor", None)
    if scratch is None or scratch.numel() < size:
        scratch = _scratch.tensor = torch.empty(size, dtype=torch.float32)
    threads = torch.get_num_threads()
    y, y_row = out.data_ptr(), out.stride(0)
    _library.llmrun_gemv(x.data_ptr(), operand.pointer, y, y_row, scratch.data_ptr(), m, accumulate, threads)


def takes_float(n: int, k: int) -> bool:
    """Whether the bound build multiplies a float32 weight (N, K) (``gemv_float``): AVX2 builds, N a multiple
    of 4 and K of 16."""
    return vectorized() and n % 4 == 0 and k % 16 == 0


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


def dequantize(operand: Operand, first: int, rows: int, out: torch.Tensor) -> torch.Tensor:
    """Rows first .. first + rows - 1 of the weight, dequantized into ``out`` (at least rows x K float32)."""
    view = out[:rows]
    _library.llmrun_dequant(operand.pointer, view.data_ptr(), first, rows, torch.get_num_threads())
    return view
