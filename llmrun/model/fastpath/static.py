"""The static-shape decoder: the same shapes at every position, for ``torch.compile`` and CUDA graphs."""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

from llmrun.model.fastpath.buffers import LayerPlan
from llmrun.model.fastpath.gemv import PRODUCTS
from llmrun.model.fastpath.step import FastDecoder
from llmrun.model.kvcache import KVCache
from llmrun.model.transformer import Transformer


def compile_enabled() -> bool:
    """Whether CUDA decoders compile their step with ``torch.compile``: unless ``LLMRUN_COMPILE=0``."""
    return os.environ.get("LLMRUN_COMPILE", "1") != "0"


class StaticDecoder(FastDecoder):
    """Decode steps whose every tensor has the same shape at every position (the GPU's decoder).

    The position is a device tensor (``buffers.pos``) and attention (SDPA) covers the whole cache
    under an additive mask built from it, so a step depends on no Python number and syncs nothing.
    ``compile`` (default: on CUDA unless ``LLMRUN_COMPILE=0``) runs the step through
    ``torch.compile``; where that fails the step stays eager and ``compile_error`` says why.
    ``graph`` (default: on CUDA) captures the step in a CUDA graph that every step replays. Both
    happen here, at construction, never inside a token's latency. Products are ``torch.mm``.
    Without a graph it runs on any device, the CPU included.
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
        windows = {plan.window for plan in self.buffers.layers}
        self.masked = {w: torch.empty(s_max, dtype=torch.bool, device=device) for w in windows}
        self.bias = {w: self.buffers.empty(1, s_max) for w in windows}  # 0 where attended, -inf elsewhere
        self._run = self._compile() if self.compiled else self._eager
        self._graph = self._capture() if self.graphed else None

    def _step(self, token: torch.Tensor, pos: int) -> None:
        self.token.copy_(token)
        if self._graph is not None:
            self._graph.replay()
        else:
            self._run()

    def _eager(self) -> None:
        """The step at position ``buffers.pos`` for the ids in ``token``."""
        b = self.buffers
        self._begin(self.token, b.cos_table.index_select(0, b.pos), b.sin_table.index_select(0, b.pos))
        for window, masked in self.masked.items():
            torch.gt(self.positions, b.pos, out=masked)
            if window is not None:
                masked.logical_or_(self.positions <= b.pos - window)
            self.bias[window].zero_().masked_fill_(masked, float("-inf"))
        self._layers()

    def _attend(self, plan: LayerPlan) -> None:
        # The G query heads of a K/V head as G queries: grouped-query attention without repeating K/V.
        b = self.buffers
        attended = F.scaled_dot_product_attention(b.q, plan.k, plan.v, attn_mask=self.bias[plan.window], scale=1.0)
        b.o4.copy_(attended)

    def _compile(self):
        """``torch.compile`` of the step (fusing the small ops into few kernels), compiled now.

        Where it fails (no compiler toolchain, an unsupported op), the step stays eager and
        ``compile_error`` says why.
        """
        compiled = torch.compile(self._eager, fullgraph=True, dynamic=False)
        self.buffers.pos.fill_(self.cache.max_seq_len - 1)
        try:
            with torch.inference_mode():
                for _ in range(2):
                    compiled()
        except Exception as exc:  # torch._dynamo / inductor raise many types; any of them means: stay eager
            self.compiled = False
            self.compile_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            print(
                f"llmrun: torch.compile of the decode step failed, running it uncompiled ({self.compile_error})",
                file=sys.stderr,
            )
            return self._eager
        return compiled

    def _capture(self) -> torch.cuda.CUDAGraph:
        """Warm up on a side stream, then record one step into a CUDA graph.

        The warm-up and capture write the last cache slot; a decode at that position writes it
        again before reading it, and masked positions never contribute, so nothing leaks.
        """
        self.buffers.pos.fill_(self.cache.max_seq_len - 1)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):
                self._run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            self._run()
        torch.cuda.synchronize()
        return graph
