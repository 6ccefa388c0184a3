"""The CPU decoder: the position a Python int, attention over the filled span of the cache only."""

from __future__ import annotations

import math

import torch

from llmrun.model.fastpath.buffers import DecodeBuffers, LayerPlan
from llmrun.model.fastpath.gemv import PRODUCTS, cpu_gemv
from llmrun.model.fastpath.step import FastDecoder
from llmrun.model.kvcache import KVCache
from llmrun.model.probe import NULL_PROBE, Probe
from llmrun.model.quant import QuantWeight, native
from llmrun.model.quant.kernels import native_operand
from llmrun.model.transformer import Transformer

# Keys from which float32 decode attention runs on all threads: over shorter spans a parallel region
# costs more than the work. bf16/fp16 attention stays on one thread: it multiplies float32 copies that
# the main thread has just written. ``scripts/bench_attention.py`` compares the choices (measurements:
# docs/performance.md, "Decode attention on threads").
WIDE_ATTENTION_KEYS = 256


class Threads:
    """A decode step on one thread, widened to all of them for the matrix products.

    For a small op a parallel region costs more than its work (and waits for any descheduled
    thread), so ``with threads:`` runs a step on one thread and ``wide()``/``narrow()`` bracket the
    ops with enough work to share; on leaving, torch is back at the thread count it had on entry.
    """

    def __init__(self) -> None:
        self.count = 1  # threads of a wide op in the current step

    def __enter__(self) -> Threads:
        self.count = torch.get_num_threads()
        self.narrow()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wide()

    def wide(self) -> None:
        if self.count > 1:
            torch.set_num_threads(self.count)

    def narrow(self) -> None:
        if self.count > 1:
            torch.set_num_threads(1)


class WideProducts:
    """A kernel's products (``llmrun.model.fastpath.gemv``), each run on all threads (``Threads.wide``)."""

    def __init__(self, products, threads: Threads) -> None:
        self.pack, self.keep = products.pack, products.keep
        self._product, self._accumulate = products.product, products.accumulate
        self.threads = threads

    def product(self, out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.threads.wide()
        self._product(out, x, w, bias)
        self.threads.narrow()

    def accumulate(self, acc: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None):
        self.threads.wide()
        acc = self._accumulate(acc, x, w, bias)
        self.threads.narrow()
        return acc


class CpuDecoder(FastDecoder):
    """Fast decode steps on the CPU: products through ``cpu_gemv``'s kernel, attention on the filled span.

    ``gemv`` picks the kernel (``cpu_gemv``; default: the model's measured ``decode_gemv``). Attention is bmm,
    softmax in place, bmm over the positions filled so far (a sliding window's last ones), cheaper at
    one query than SDPA's kernel; in bf16/fp16 it runs on float32 copies of K, V and q: a bf16 bmm
    copies K^T and rounds its scores to bf16. In float32, with the native library bound, each RMSNorm,
    the SiLU·mul, RoPE and attention (the cache written, then softmax(q K^T) V) are one native call
    each (``fused_ops``, ``native_attention``). ``step(token, probe)`` marks every op
    group on ``probe`` (``llmrun.profiler.timers.OpTimer`` times them); without a probe the step is
    unchanged.
    """

    def __init__(self, model: Transformer, cache: KVCache, *, gemv: str | None = None) -> None:
        dtype = model.model.embed_tokens.weight.dtype
        self.gemv = cpu_gemv(dtype, gemv or model.decode_gemv)
        self.threads = Threads()
        super().__init__(model, cache, WideProducts(PRODUCTS[self.gemv](cache.batch), self.threads))
        self.scratch = _AttentionScratch(self.buffers, cache.max_seq_len, float32=dtype != torch.float32)
        self.windows = tuple(dict.fromkeys(plan.window for plan in self.buffers.layers))
        self._spans: dict[int | None, _Span] = {}
        # float32 norms, SiLU·mul, RoPE and attention as native calls where the native library is bound:
        # a decode step's small ops cost their dispatch more than their arithmetic
        self.fused_ops = dtype == torch.float32 and native.bound()
        self.eps = model.args.rms_norm_eps
        self.native_attention = {}
        if self.fused_ops:
            b = self.buffers
            self.native_attention = {
                plan: native.Attention(b.qkv, b.cos, b.sin, b.qk, plan.k, plan.v, b.o, threads=torch.get_num_threads())
                for plan in b.layers
            }
        self.native_layers = self._native_layers()
        self.pos = 0

    def _native_layers(self) -> list[native.Layer]:
        """Every block as one native call (``native.Layer``), where each block's four products run through
        llmrun's native kernels (the quantized ones chosen now, or the float32 ``native`` decode kernel),
        without biases, on one device (no tensor parallelism); else none, and the blocks run op by op."""
        b = self.buffers
        if not self.native_attention or self.parallel is not None:
            return []
        layers = []
        for plan in b.layers:
            if any(bias is not None for bias in (plan.bqkv, plan.bo, plan.bgate_up, plan.bdown)):
                return []
            products = [self._native_product(w) for w in (plan.wqkv, plan.wo, plan.wgate_up, plan.wdown)]
            if any(p is None for p in products):
                return []
            norms = plan.attn_norm, plan.mlp_norm
            attention = self.native_attention[plan]
            layers.append(native.Layer(b.x, b.h, b.gate_up, b.act, *norms, self.eps, products, attention))
        return layers

    def _native_product(self, weight) -> native.Product | None:
        """What ``native.Layer`` multiplies by for a block's (packed) weight, or None where no native kernel does."""
        if isinstance(weight, torch.Tensor):
            native_dense = self.gemv == "native" and weight.is_contiguous() and native.takes_float(*weight.shape)
            return weight if native_dense else None
        return native_operand(weight) if isinstance(weight, QuantWeight) else None

    def _step(self, token: torch.Tensor, pos: int, probe: Probe = NULL_PROBE) -> None:
        b = self.buffers
        self.pos = pos
        with self.threads:
            self._spans = {window: self.scratch.span(pos + 1, window) for window in self.windows}
            self._begin(token, b.cos_table[pos], b.sin_table[pos], probe)
            self._layers(probe)

    _probed_step = _step

    def _blocks(self, probe: Probe = NULL_PROBE) -> torch.Tensor:
        if probe is not NULL_PROBE or not self.native_layers:  # op by op, each op group marked
            return super()._blocks(probe)
        for plan, layer in zip(self.buffers.layers, self.native_layers, strict=True):
            start, end = self._spans[plan.window][:2]
            layer.run(self.pos, start, end, self._attention_threads(start, end), self.threads.count)
        return self.buffers.x

    def _attention_threads(self, start: int, end: int) -> int:
        """Threads of float32 attention over keys start..end-1: all of the step's from ``WIDE_ATTENTION_KEYS`` on."""
        return self.threads.count if end - start >= WIDE_ATTENTION_KEYS else 1

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> None:
        if self.fused_ops and x.is_contiguous():  # one native call for the five ops of the float32 formula
            native.rms_norm(self.buffers.h, x, weight, self.eps)
        else:
            super()._norm(x, weight)

    def _act(self) -> None:
        b = self.buffers
        if self.fused_ops:
            native.silu_mul(b.act, b.gate, b.up)
        else:
            super()._act()

    def _rope(self, plan: LayerPlan) -> None:
        if self.native_attention:
            self.native_attention[plan].rope()
        else:
            super()._rope(plan)

    def _attend(self, plan: LayerPlan) -> None:
        b = self.buffers
        start, end, scores, k32, v32 = self._spans[plan.window]
        if self.native_attention:  # the cache written and attention in one native call
            self.native_attention[plan].attend(self.pos, start, end, self._attention_threads(start, end))
            return
        self._store(plan)
        if k32 is None:
            wide = self._attention_threads(start, end) > 1
            if wide:
                self.threads.wide()
            _attention(
                b.matmul, b.q_heads, plan.k_t[..., start:end], plan.v_heads[..., start:end, :], scores, b.o_heads
            )
            if wide:
                self.threads.narrow()
        else:
            q32, o32 = self.scratch.q32, self.scratch.o32
            k32.copy_(plan.k_heads[..., start:end, :])
            v32.copy_(plan.v_heads[..., start:end, :])
            q32.copy_(b.q_heads)
            _attention(b.matmul, q32, k32.transpose(-1, -2), v32, scores, o32)
            b.o_heads.copy_(o32)


# A step's key span for the layers with one window: first and end position, scores ([B,] Hkv, G, n)
# and, in bf16/fp16, float32 K and V scratch ([B,] Hkv, n, D) for its n keys.
_Span = tuple[int, int, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


class _AttentionScratch:
    """The sliced attention's scores and (``float32``: for a bf16/fp16 model) float32 copies, for S_max keys."""

    def __init__(self, buffers: DecodeBuffers, s_max: int, *, float32: bool) -> None:
        heads, (group, hd) = buffers.q_heads.shape[:-2], buffers.q_heads.shape[-2:]
        self.scores_shape = (*heads, group)
        self.scores_per_key = math.prod(self.scores_shape)
        self.scores = buffers.empty(self.scores_per_key * s_max, dtype=torch.float32 if float32 else None)
        self.k32 = self.v32 = self.q32 = self.o32 = None
        if float32:
            self.k32 = buffers.empty(*heads, s_max, hd, dtype=torch.float32)
            self.v32 = buffers.empty(*heads, s_max, hd, dtype=torch.float32)
            self.q32 = buffers.empty(*heads, group, hd, dtype=torch.float32)
            self.o32 = buffers.empty(*heads, group, hd, dtype=torch.float32)

    def span(self, end: int, window: int | None) -> _Span:
        """Views for attention over keys ..end-1 (the last ``window`` of them with a window)."""
        start = 0 if window is None else max(0, end - window)
        n = end - start
        scores = self.scores[: self.scores_per_key * n].view(*self.scores_shape, n)
        if self.k32 is None:
            return start, end, scores, None, None
        return start, end, scores, self.k32[..., :n, :], self.v32[..., :n, :]


def _attention(
    matmul, q: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor, scores: torch.Tensor, out: torch.Tensor
) -> None:
    """softmax(q k^T) v into ``out``; q carries the 1/sqrt(D) scale, ``scores`` becomes the weights in place."""
    matmul(q, k_t, out=scores)
    torch._softmax(scores, -1, False, out=scores)
    matmul(scores, v, out=out)
