"""The static-shape decoder: a few fixed shapes of the step, for ``torch.compile`` and CUDA graphs."""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F

from llmrun.model.fastpath.buffers import LayerPlan
from llmrun.model.fastpath.gemv import PRODUCTS
from llmrun.model.fastpath.step import FastDecoder
from llmrun.model.kvcache import KVCache
from llmrun.model.transformer import Transformer

SMALLEST_SPAN = 256  # keys attended by the shortest span; each longer span doubles it, up to the cache's capacity


def compile_enabled() -> bool:
    """Whether CUDA decoders compile their step with ``torch.compile``: unless ``LLMRUN_COMPILE=0``."""
    return os.environ.get("LLMRUN_COMPILE", "1") != "0"


def key_spans(capacity: int) -> list[int]:
    """The key spans a static step attends over for a cache of ``capacity`` positions, shortest first.

    Powers of two from ``SMALLEST_SPAN`` and then ``capacity`` itself, so a step at position p reads the
    K/V of fewer than 2(p + 1) positions (and at least ``SMALLEST_SPAN``), never the whole capacity.
    """
    spans, span = [], min(SMALLEST_SPAN, capacity)
    while span < capacity:
        spans.append(span)
        span *= 2
    return [*spans, capacity]


class StaticDecoder(FastDecoder):
    """Decode steps whose tensors have one of a few fixed shapes (the GPU's decoder).

    The position is a device tensor (``buffers.pos``); attention (SDPA) covers the first ``span``
    keys of the cache under an additive mask built from it, where ``span`` is the shortest of
    ``key_spans`` that holds the filled positions, so the K/V read per step follows the
    conversation's length, not the cache's capacity. Within a span a step depends on no Python
    number and syncs nothing.

    ``compile`` (default: on CUDA unless ``LLMRUN_COMPILE=0``) runs the step through
    ``torch.compile`` with the span as a dynamic size (two compilations at most, ``_compile``); where
    compiling fails the step stays eager and ``compile_error`` says why. ``graph`` (default: on
    CUDA) captures one CUDA graph per span, all in one memory pool: the span of the cache's current
    length at construction, each other the first time a step needs it (a capture costs a few steps'
    time, no compilation; ``prepare_s`` sums them). Products are ``torch.mm``. Without a graph it
    runs on any device, the CPU included.
    """

    def __init__(
        self, model: Transformer, cache: KVCache, *, graph: bool | None = None, compile: bool | None = None
    ) -> None:
        device = cache.layers[0].k.device
        cuda = device.type == "cuda"
        self.graphed = cuda if graph is None else graph
        if self.graphed and not cuda:
            raise ValueError("CUDA graphs need a CUDA device")
        self.compiled = (cuda and compile_enabled()) if compile is None else compile
        self.compile_error: str | None = None
        super().__init__(model, cache, PRODUCTS["mm"](cache.batch))
        s_max = cache.max_seq_len
        self.token = torch.zeros(cache.batch, dtype=torch.long, device=device)
        self.positions = torch.arange(s_max, device=device)
        self.spans = key_spans(s_max)
        windows = {plan.window for plan in self.buffers.layers}
        self.masked = {w: torch.empty(s_max, dtype=torch.bool, device=device) for w in windows}
        self.bias = {w: self.buffers.empty(1, s_max) for w in windows}  # 0 where attended, -inf elsewhere
        self._keys = self.positions  # positions of the keys the step being run attends over
        self._run = self._compile() if self.compiled else self._eager
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.graphed else None
        self.prepare_s = 0.0  # seconds spent capturing graphs (compilation included at construction)
        if self.graphed:
            self._graph(self._span(cache.length + 1))

    def _span(self, end: int) -> int:
        """The shortest key span that holds positions 0..end-1."""
        return next(span for span in self.spans if span >= end)

    def _step(self, token: torch.Tensor, pos: int) -> None:
        self.token.copy_(token)
        span = self._span(pos + 1)
        if self.graphed:
            self._graph(span).replay()
        else:
            self._run(self.positions[:span])

    def _eager(self, keys: torch.Tensor) -> None:
        """The step at position ``buffers.pos`` for the ids in ``token``, attending over the positions ``keys``."""
        b = self.buffers
        self._keys = keys
        n = keys.shape[0]
        self._begin(self.token, b.cos_table.index_select(0, b.pos), b.sin_table.index_select(0, b.pos))
        for window, masked in self.masked.items():
            span_masked = masked[:n]
            torch.gt(keys, b.pos, out=span_masked)
            if window is not None:
                span_masked.logical_or_(keys <= b.pos - window)
            self.bias[window][:, :n].zero_().masked_fill_(span_masked, float("-inf"))
        self._layers()

    def _attend(self, plan: LayerPlan) -> None:
        # The G query heads of a K/V head as G queries: grouped-query attention without repeating K/V.
        self._store(plan)
        b = self.buffers
        n = self._keys.shape[0]
        k, v, bias = plan.k[:, :, :n], plan.v[:, :, :n], self.bias[plan.window][:, :n]
        b.o4.copy_(F.scaled_dot_product_attention(b.q, k, v, attn_mask=bias, scale=1.0))

    def _compile(self):
        """``torch.compile`` of the step (fusing the small ops into few kernels), compiled now.

        The spans shorter than the cache share one compilation, their length a dynamic size (their
        K/V slices are not contiguous, the whole cache is); the whole cache's span, when there are
        others, compiles on its first use. Where compiling fails (no compiler toolchain, an
        unsupported op), the step stays eager and ``compile_error`` says why.
        """
        compiled = torch.compile(self._eager, fullgraph=True)
        self.buffers.pos.fill_(self.cache.max_seq_len - 1)
        short = self.spans[:-1] or self.spans
        keys = self.positions[: short[-1]]
        if len(short) > 1:
            torch._dynamo.mark_dynamic(keys, 0, min=short[0], max=short[-1])
        try:
            with torch.inference_mode():
                for _ in range(2):
                    compiled(keys)
        except Exception as exc:  # torch._dynamo / inductor raise many types; any of them means: stay eager
            self.compiled = False
            self.compile_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            print(
                f"llmrun: torch.compile of the decode step failed, running it uncompiled ({self.compile_error})",
                file=sys.stderr,
            )
            return self._eager
        return compiled

    def _graph(self, span: int) -> torch.cuda.CUDAGraph:
        """The CUDA graph of a step attending over ``span`` keys, captured on first use."""
        graph = self._graphs.get(span)
        if graph is None:
            t0 = time.perf_counter()
            graph = self._graphs[span] = self._capture(self.positions[:span])
            self.prepare_s += time.perf_counter() - t0
        return graph

    def _capture(self, keys: torch.Tensor) -> torch.cuda.CUDAGraph:
        """Warm up on a side stream, then record one step over ``keys`` into a CUDA graph (in the shared pool).

        The warm-up and capture run at the last cache slot, which no span shorter than the whole
        cache attends to and which a decode at that position writes before reading; ``buffers.pos``
        is restored afterwards, so a capture in the middle of decoding leaves the cache as it was.
        """
        pos = self.buffers.pos.clone()
        self.buffers.pos.fill_(self.cache.max_seq_len - 1)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):
                self._run(keys)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool), torch.inference_mode():
            self._run(keys)
        torch.cuda.synchronize()
        self.buffers.pos.copy_(pos)
        return graph
