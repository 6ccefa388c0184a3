"""The kernels that multiply activations x (M, K) by a ``QuantWeight`` (N, K): y = x W^T (M, N).

Each kernel says which weights, devices and activation dtypes it takes (``accepts``), builds the
form it multiplies by once per weight on the weight's device (``prepare``, kept in
``QuantWeight.prepared``: packed layouts depend on the CPU or GPU, so they are made at load, never
stored), and runs. ``dequant`` takes everything: it dequantizes a block of rows at a time and
multiplies, the reference the others are tested against. ``native`` is llmrun's own C kernel
(``llmrun.model.quant.native``) on the stored form, in float32, where a build of it is bound.
Where the kernel needs another activation dtype than the model's (``compute``), x is cast to it
and the result back.

Shapes the kernels refuse (checked here, not left to the kernels): ``_weight_int8pack_mm`` with K
not a multiple of 16 (wrong results, or a crash); the int4 packers with N not a multiple of 16
(CPU) or 8 (CUDA), a group not in ``INT4_GROUPS``, or (CUDA) K not a multiple of 16 · inner tiles.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmrun.model.quant import native
from llmrun.model.quant.quantize import INT4_GROUPS
from llmrun.model.quant.weight import CODE_DTYPES, QuantWeight

DEQUANT_ELEMENTS = 2**20  # weight elements dequantized at once (4 MiB of float32): bounds the scratch memory
# Rows of x up to which ``native`` reads the codes once per row; from more on it dequantizes blocks of
# rows and multiplies them (torch.mm). On a 3072x576 int4 weight a row cost the row path 170 us and
# dequantizing then multiplying 830 us plus ~60 us a row (2026-12-01, AMD EPYC Zen 3, 2 threads): they
# meet near 9 rows.
NATIVE_GEMV_ROWS = 8


class Kernel:
    """One way to compute x W^T. ``compute`` None: in x's dtype; else x is cast to it and back.

    A kernel that multiplies by its own copy of the codes (repacked, regrouped) keeps it under
    ``codes_key`` in ``QuantWeight.prepared``, shared by its variants for other activation dtypes;
    once that copy exists the weight's stored codes may be dropped (``QuantWeight.drop_codes``).
    """

    name = ""
    device_type = "cpu"
    compute: torch.dtype | None = None
    codes_key: str | None = None
    serves_rows = False  # whether ``row_codes`` gives rows back from this kernel's own copy of the codes
    own_scales = False  # whether every form holds its own copy of the scales (and zeros)

    def accepts(self, weight: QuantWeight, dtype: torch.dtype) -> bool:
        """Whether this kernel computes ``weight``'s products correctly for activations in ``dtype``."""
        has_codes = weight.codes is not None or (self.codes_key is not None and self.codes_key in weight.prepared)
        has_scales = weight.scales is not None or self.form_key(self.compute or dtype) in weight.prepared
        return (
            has_codes and has_scales and weight.device.type == self.device_type
            and self.takes(weight, self.compute or dtype)
        )  # fmt: skip

    def own_codes(self, weight: QuantWeight, make) -> torch.Tensor:
        """This kernel's copy of the codes, ``make()`` the first time (kept under ``codes_key``)."""
        codes = weight.prepared.get(self.codes_key)
        if codes is None:
            codes = weight.prepared[self.codes_key] = make()
        return codes

    def takes(self, weight: QuantWeight, dtype: torch.dtype) -> bool:
        """Whether this kernel computes products of a weight of ``weight``'s format and shape in ``dtype``."""
        raise NotImplementedError

    def rounds(self, dtype: torch.dtype) -> bool:
        """Whether this kernel rounds activations of ``dtype`` to a narrower float type (bf16 for float32) first:
        to 2^-9 of each element, which moves greedy output (the tuner's ``ROUNDING_MARGIN``)."""
        return self.compute is not None and self.compute.itemsize < dtype.itemsize

    def read_bytes(self, weight: QuantWeight, dtype: torch.dtype) -> int:
        """Bytes of the form ``run`` reads per product with activations in ``dtype``: the codes (1 byte
        per weight for 8-bit, 1/2 for 4-bit) and the scales (and zeros) in the dtype it holds them in."""
        n, k = weight.shape
        scales = n * (k // weight.group) * (2 if weight.bits == 4 else 1)
        return n * k * weight.bits // 8 + scales * (self.compute or dtype).itemsize

    def prepare(self, weight: QuantWeight, dtype: torch.dtype) -> object:
        """The form ``run`` multiplies by, for activations in ``dtype``."""
        raise NotImplementedError

    def row_codes(self, weight: QuantWeight, ids: torch.Tensor) -> torch.Tensor:
        """The codes of rows ``ids`` (R,) as (R, K), as ``QuantWeight.unpacked_codes`` gives them, from this
        kernel's own copy (``serves_rows`` kernels only; the stored codes may be gone)."""
        raise NotImplementedError

    def form_key(self, dtype: torch.dtype) -> str:
        """The key of this kernel's form for activations in ``dtype`` in ``QuantWeight.prepared``."""
        return f"{self.name}:{dtype}"

    def form(self, weight: QuantWeight, dtype: torch.dtype) -> object:
        """``prepare``'s form for activations in ``dtype``, made once and kept in ``weight.prepared``."""
        key = self.form_key(dtype)
        form = weight.prepared.get(key)
        if form is None:
            form = weight.prepared[key] = self.prepare(weight, dtype)
        return form

    def run(self, x: torch.Tensor, weight: QuantWeight) -> torch.Tensor:
        """x (M, K) -> x W^T (M, N) in x's dtype."""
        dtype = self.compute or x.dtype
        return self.multiply(x.to(dtype), self.form(weight, dtype)).to(x.dtype)

    def product_into(self, out: torch.Tensor, x: torch.Tensor, weight: QuantWeight, *, accumulate: bool) -> None:
        """out (M, N) = x (M, K) W^T, or out += x W^T (``accumulate``): a decode step's buffers."""
        y = self.run(x, weight)
        if accumulate:
            out.add_(y)
        else:
            out.copy_(y)

    def multiply(self, x: torch.Tensor, form) -> torch.Tensor:
        raise NotImplementedError


class Dequant(Kernel):
    """Dequantize ``DEQUANT_ELEMENTS`` at a time and multiply: any weight, device and dtype."""

    name = "dequant"

    def accepts(self, weight: QuantWeight, dtype: torch.dtype) -> bool:
        return weight.codes is not None and weight.scales is not None

    def takes(self, weight: QuantWeight, dtype: torch.dtype) -> bool:
        return True

    def form(self, weight: QuantWeight, dtype: torch.dtype) -> object:
        return None  # it multiplies by the stored form itself

    def read_bytes(self, weight: QuantWeight, dtype: torch.dtype) -> int:
        return weight.nbytes

    def run(self, x: torch.Tensor, weight: QuantWeight) -> torch.Tensor:
        return _by_row_blocks(x, weight, lambda start, stop: weight.dequantize(x.dtype, slice(start, stop)))


class Native(Kernel):
    """llmrun's C kernels on the stored codes (no other copy) and their own scales, in float32.

    The form is a ``native.Operand``: the stored codes, the scales as ``native.Scales`` and the form of
    product. Few rows of x (``NATIVE_GEMV_ROWS``): each weight row's codes are read once per row of x;
    more: blocks of rows dequantized by the C code into one float32 scratch, then multiplied by torch.mm.
    Takes K and groups that are multiples of 32 and contiguous codes, once a build is bound.
    """

    name, compute, own_scales = "native", torch.float32, True
    tiled = False  # four weight rows at a time (``NativeTiled``)
    x16 = False  # x rounded to the 16-bit form (``NativeX16``)

    def takes(self, weight: QuantWeight, dtype: torch.dtype) -> bool:
        return native.bound() and native.takes(weight.bits, weight.shape[1], weight.group)

    def accepts(self, weight: QuantWeight, dtype: torch.dtype) -> bool:
        return super().accepts(weight, dtype) and weight.codes.is_contiguous()

    def prepare(self, weight: QuantWeight, dtype: torch.dtype) -> object:
        scales = native.Scales.of(weight.scales, weight.zeros)
        return native.Operand(weight.codes, scales, tiled=self.tiled, x16=self.x16)

    def read_bytes(self, weight: QuantWeight, dtype: torch.dtype) -> int:
        """The stored codes and the form's scales (float32 until the form exists: what the weight stores)."""
        form = weight.prepared.get(self.form_key(self.compute))
        scales = form.nbytes if form is not None else weight.nbytes - weight.codes_bytes
        return weight.codes_bytes + scales

    def run(self, x: torch.Tensor, weight: QuantWeight) -> torch.Tensor:
        x32 = x.to(torch.float32).contiguous()
        operand = self.form(weight, torch.float32)
        if x.shape[0] <= NATIVE_GEMV_ROWS:
            out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
            native.gemv(out, x32, operand)
            return out.to(x.dtype)
        scratch = torch.empty(min(weight.shape[0], max(1, DEQUANT_ELEMENTS // weight.shape[1])), weight.shape[1])

        def dequantized(start: int, stop: int) -> torch.Tensor:
            return native.dequantize(operand, start, stop - start, scratch)

        return _by_row_blocks(x32, weight, dequantized).to(x.dtype)

    def product_into(self, out: torch.Tensor, x: torch.Tensor, weight: QuantWeight, *, accumulate: bool) -> None:
        """The C product straight into ``out`` where x and out are float32 decode rows; else ``Kernel``'s."""
        direct = (
            x.dtype == out.dtype == torch.float32 and x.shape[0] <= NATIVE_GEMV_ROWS
            and x.is_contiguous() and out.stride(-1) == 1
        )  # fmt: skip
        if direct:
            native.gemv(out, x, self.form(weight, torch.float32), accumulate=accumulate)
        else:
            super().product_into(out, x, weight, accumulate=accumulate)


class NativeTiled(Native):
    """``Native`` multiplying four weight rows at a time (where the build has that form: AVX2)."""

    name, tiled = "native-tiled", True

    def takes(self, weight: QuantWeight, dtype: torch.dtype) -> bool:
        return native.vectorized() and super().takes(weight, dtype)


class NativeX16(NativeTiled):
    """``NativeTiled`` on x rounded to 16-bit integer codes times a float32 step per 32 columns, summed by
    integer multiply-adds: about half the instructions per weight. The rounding, to 2^-16 of each
    block's largest magnitude, is far finer than bf16's, and no ``rounds`` kernel: on the default
    model it changed none of ``scripts/quant_agreement.py``'s 20 greedy outputs. Many rows of x are
    multiplied as ``Native`` does, exactly."""

    name, x16 = "native-x16", True


def native_operand(weight: QuantWeight) -> native.Operand | None:
    """The ``native.Operand`` that ``weight``'s kernel (its measured choice, else the default for float32
    activations) multiplies by, where that kernel is one of llmrun's native ones; else None."""
    kernel = KERNELS[weight.kernel or default_kernel(weight, torch.float32)]
    if not isinstance(kernel, Native) or not kernel.accepts(weight, torch.float32):
        return None
    return kernel.form(weight, torch.float32)


def _by_row_blocks(x: torch.Tensor, weight: QuantWeight, rows) -> torch.Tensor:
    """x (M, K) W^T with W's rows dequantized ``DEQUANT_ELEMENTS`` at a time: ``rows(start, stop)`` gives them."""
    n, k = weight.shape
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    step = max(1, DEQUANT_ELEMENTS // k)
    for start in range(0, n, step):
        stop = min(n, start + step)
        out[:, start:stop] = x @ rows(start, stop).t()
    return out


class CpuInt8(Kernel):
    """``_weight_int8pack_mm``: int8 per channel, K a multiple of 16."""

    name = "int8pack"

    def takes(self, weight: QuantWeight, dtype: torch.dtype) -> bool:
        return weight.format == "int8" and weight.shape[1] % 16 == 0 and dtype.is_floating_point

    def prepare(self, weight: QuantWeight, dtype: torch.dtype) -> object:
        return weight.codes, weight.scales.view(-1).to(dtype)

    def multiply(self, x: torch.Tensor, form) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, *form)


class CpuInt8Groups(Kernel):
    """int8 with a scale per group of columns (GGUF Q8_0): one ``_weight_int8pack_mm`` per group, summed."""

    name, codes_key, serves_rows, own_scales = "int8pack-groups", "int8-groups-codes", True, True

    def takes(self, weight: QuantWeight, dtype: torch.dtype) -> bool:
        return weight.bits == 8 and weight.format != "int8" and weight.group % 16 == 0 and dtype.is_floating_point

    def prepare(self, weight: QuantWeight, dtype: torch.dtype) -> object:
        n, k = weight.shape
        group = weight.group
        codes = self.own_codes(weight, lambda: weight.codes.view(n, k // group, group).transpose(0, 1).contiguous())
        return codes, weight.scales.t().to(dtype).contiguous(), weight.group  # (G, N)

    def row_codes(self, weight: QuantWeight, ids: torch.Tensor) -> torch.Tensor:
        codes = weight.prepared[self.codes_key][:, ids]  # (G, R, group)
        return codes.transpose(0, 1).reshape(len(ids), weight.shape[1])

    def multiply(self, x: torch.Tensor, form) -> torch.Tensor:
        codes, scales, group = form
        out = torch.ops.aten._weight_int8pack_mm(x[:, :group], codes[0], scales[0])
        for g in range(1, codes.shape[0]):
            out += torch.ops.aten._weight_int8pack_mm(x[:, g * group : (g + 1) * group], codes[g], scales[g])
        return out


class CpuInt4(Kernel):
    """``_weight_int4pack_mm_for_cpu`` on codes repacked for this CPU: N a multiple of 16."""

    name, codes_key, own_scales = "int4pack", "cpu-int4-codes", True

    def takes(self, weight: QuantWeight, dtype: torch.dtype) -> bool:
        return (
            weight.bits == 4 and weight.group in INT4_GROUPS and weight.shape[0] % 16 == 0 and dtype.is_floating_point
        )

    def prepare(self, weight: QuantWeight, dtype: torch.dtype) -> object:
        pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu
        packed = self.own_codes(weight, lambda: pack(weight.unpacked_codes().to(torch.int32), 1))
        return packed, weight.group, _scales_and_zeros(weight, dtype)

    def multiply(self, x: torch.Tensor, form) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, *form)


class CpuInt8Bf16(CpuInt8):
    """``CpuInt8`` on bf16 activations (cast from the model's dtype and back)."""

    name, compute = "int8pack-bf16", torch.bfloat16


class CpuInt8GroupsBf16(CpuInt8Groups):
    """``CpuInt8Groups`` on bf16 activations."""

    name, compute = "int8pack-groups-bf16", torch.bfloat16


class CpuInt4Bf16(CpuInt4):
    """``CpuInt4`` on bf16 activations (its scales and zeros rounded to bf16)."""

    name, compute = "int4pack-bf16", torch.bfloat16


class CudaInt4(Kernel):
    """``_weight_int4pack_mm`` (tinygemm, sm80+): bf16 activations, N a multiple of 8, K of 16 · inner tiles."""

    name, device_type, compute, codes_key, own_scales = "cuda-int4pack", "cuda", torch.bfloat16, "cuda-int4-codes", True

    def accepts(self, weight: QuantWeight, dtype: torch.dtype) -> bool:
        return super().accepts(weight, dtype) and torch.cuda.get_device_capability(weight.device) >= (8, 0)

    def takes(self, weight: QuantWeight, dtype: torch.dtype) -> bool:
        n, k = weight.shape
        return weight.bits == 4 and weight.group in INT4_GROUPS and n % 8 == 0 and k % 32 == 0

    def prepare(self, weight: QuantWeight, dtype: torch.dtype) -> object:
        k = weight.shape[1]
        tiles = next(t for t in (8, 4, 2) if k % (16 * t) == 0)
        packed = self.own_codes(weight, lambda: torch.ops.aten._convert_weight_to_int4pack(weight.codes, tiles))
        return packed, weight.group, _scales_and_zeros(weight, dtype)

    def multiply(self, x: torch.Tensor, form) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm(x, *form)


class CudaInt8(Kernel):
    """int8 per channel on CUDA: F.linear on the codes cast to x's dtype, times the scales."""

    name, device_type = "cuda-int8", "cuda"

    def takes(self, weight: QuantWeight, dtype: torch.dtype) -> bool:
        return weight.format == "int8" and dtype.is_floating_point

    def prepare(self, weight: QuantWeight, dtype: torch.dtype) -> object:
        return weight.codes, weight.scales.view(-1).to(dtype)

    def multiply(self, x: torch.Tensor, form) -> torch.Tensor:
        codes, scales = form
        return F.linear(x, codes.to(x.dtype)) * scales


def _scales_and_zeros(weight: QuantWeight, dtype: torch.dtype) -> torch.Tensor:
    """(K/group, N, 2) in ``dtype``: the int4 kernels' ``qScaleAndZeros`` made from the weight's scales and zeros.

    In float32 it holds the same numbers as the stored ones, so the weight's scales and zeros become
    views of it (strided, which every kernel takes): one copy in memory, not two.
    """
    pairs = torch.stack((weight.scales.t(), weight.zeros.t()), dim=-1).to(dtype).contiguous()
    if dtype == torch.float32:
        weight.scales, weight.zeros = pairs[..., 0].t(), pairs[..., 1].t()
    return pairs


# Every kernel by name, in the order the default choice tries them: llmrun's own (float32, exact) where
# it is built, then PyTorch's in the model's own dtype, then a cast to bf16, and ``dequant`` last, which
# takes everything.
KERNELS: dict[str, Kernel] = {
    kernel.name: kernel
    for kernel in (
        Native(), NativeTiled(), NativeX16(), CpuInt8(), CpuInt8Groups(), CpuInt4(),
        CpuInt8Bf16(), CpuInt8GroupsBf16(), CpuInt4Bf16(), CudaInt4(), CudaInt8(), Dequant(),
    )
}  # fmt: skip


def candidates(weight: QuantWeight, dtype: torch.dtype) -> list[str]:
    """The kernels that compute ``weight``'s products correctly for activations in ``dtype``, in ``KERNELS`` order."""
    return [name for name, kernel in KERNELS.items() if kernel.accepts(weight, dtype)]


def default_kernel(weight: QuantWeight, dtype: torch.dtype) -> str:
    """The kernel used for ``weight`` without a measured choice: the first candidate (``candidates``)."""
    return candidates(weight, dtype)[0]


def predicted_read_bytes(bits: int, group: int, n: int, k: int, dtype: torch.dtype, device_type: str) -> int:
    """Bytes per product of an (N, K) weight with ``bits``-bit codes and a scale per ``group`` columns, in the
    form of the kernel a weight gets without a measured choice (``default_kernel``) on a ``device_type``
    device with activations in ``dtype``: computed from the shape alone, before any weight exists (a CUDA
    device is taken to be sm80 or newer)."""
    codes = torch.empty(n, k * bits // 8, dtype=CODE_DTYPES[bits], device="meta")
    scales = torch.empty(n, k // group, dtype=torch.float32, device="meta")
    weight = QuantWeight(codes, scales, torch.empty_like(scales) if bits == 4 else None, dtype=dtype)
    default = [
        kern
        for kern in KERNELS.values()
        if kern.device_type == device_type and kern.takes(weight, kern.compute or dtype)
    ]
    return (default[0] if default else KERNELS["dequant"]).read_bytes(weight, dtype)
