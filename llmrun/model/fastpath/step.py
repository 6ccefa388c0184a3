"""The decode step both fast decoders run: everything but where the position comes from and attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmrun.model.fastpath.buffers import DecodeBuffers, LayerPlan
from llmrun.model.kvcache import KVCache
from llmrun.model.probe import NULL_PROBE, Probe
from llmrun.model.transformer import Transformer, fuse_projections


class FastDecoder:
    """Decode steps for one model and one ``KVCache`` through ``DecodeBuffers`` allocated once.

    ``step(token)`` reads token ids (B,) or (B, 1) at position ``cache.length`` and returns logits
    (B, V) float32: a buffer that the next step overwrites (copy it to keep it). Subclasses
    (``CpuDecoder``, ``StaticDecoder``) give ``_step(token, pos)``, which starts the step (``_begin``)
    and runs ``_layers``, and ``_attend(plan)``, attention of the rotated q over one layer's cache.
    ``products`` multiplies activations by the packed weights (``llmrun.model.fastpath.gemv``).
    A decoder that can be profiled op by op gives ``_probed_step(token, pos, probe)``: the same step
    with ``probe.mark`` called after each op group (``llmrun.model.probe.FAST_LAYER_OPS``).
    """

    def __init__(self, model: Transformer, cache: KVCache, products) -> None:
        fuse_projections(model)
        self.model, self.cache, self.products = model, cache, products
        self.buffers = DecodeBuffers(model, cache, products)
        # A tensor-parallel shard (``llmrun.model.parallel``) sums its o/down products over the ranks
        # in ``partial`` (B, d) before the residual add, and gathers the logits of its vocabulary rows.
        self.parallel = model.parallel
        self.partial = None
        if self.parallel is not None:
            self.partial = torch.empty_like(self.buffers.x)
            products.keep(self.partial)

    @torch.inference_mode()
    def step(self, token: torch.Tensor, probe: Probe = NULL_PROBE) -> torch.Tensor:
        """Token ids (B,) or (B, 1) at position ``cache.length`` -> logits (B, V) float32 (a reused buffer).

        The cache grows by one position. A ``probe`` other than the null one sees ``probe.mark`` at
        the end of every op group (``_probed_step``); without one the step runs as it always does.
        """
        pos = self.cache.reserve(1)
        self.buffers.pos.fill_(pos)
        if probe is NULL_PROBE:
            self._step(token.view(-1), pos)
        else:
            self._probed_step(token.view(-1), pos, probe)
        self.cache.length = pos + 1
        if self.parallel is not None:
            return self.parallel.gather_last(self.buffers.logits)
        return self.buffers.logits

    def _step(self, token: torch.Tensor, pos: int) -> None:
        raise NotImplementedError

    def _probed_step(self, token: torch.Tensor, pos: int, probe: Probe) -> None:
        raise ValueError(f"{type(self).__name__} takes no probe: time its steps as a whole")

    def _rope(self, plan: LayerPlan) -> None:
        """RoPE on the q and k rows of ``buffers.qkv`` together into ``buffers.qk``: x · cos + rotate_half(x) · sin."""
        b = self.buffers
        torch.index_select(b.qk_in, -1, b.perm, out=b.rotated)
        b.rotated.mul_(b.sin)
        torch.addcmul(b.rotated, b.qk_in, b.cos, out=b.qk)

    def _store(self, plan: LayerPlan) -> None:
        """This step's rotated k and its v into ``plan``'s cache, at the step's position."""
        b = self.buffers
        plan.k.index_copy_(2, b.pos, b.k_new)
        plan.v.index_copy_(2, b.pos, b.v_new)

    def _attend(self, plan: LayerPlan) -> None:
        """This step's k and v into ``plan``'s cache (``_store``), then attention of ``buffers.q`` over it into
        ``buffers.o``."""
        raise NotImplementedError

    def _begin(self, token: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, probe: Probe = NULL_PROBE) -> None:
        """Embed token ids (B,) into ``x``; scale this step's angles cos, sin (1, D) or (D,) per head."""
        b = self.buffers
        if self.parallel is None:
            b.lookup(token)
        else:
            b.x.copy_(self.parallel.embed(token, b.embed, self.model.model.embed_tokens.vocab_start))
        probe.mark("embed")
        torch.mul(cos, b.head_scale, out=b.cos)
        torch.mul(sin, b.head_scale, out=b.sin)
        probe.mark(None)  # the step's angle rows: part of no named op

    def _layers(self, probe: Probe = NULL_PROBE) -> None:
        """Every block from ``x``, then the final norm and the lm_head into ``logits``; ``probe`` marks op groups."""
        b = self.buffers
        x = self._blocks(probe)
        self._norm(x, b.final_norm)
        probe.mark("final_norm")
        self.products.product(b.logits_mm, b.h, b.lm_head, None)
        if b.logits_mm is not b.logits:
            b.logits.copy_(b.logits_mm)
        probe.mark("lm_head")

    def _blocks(self, probe: Probe = NULL_PROBE) -> torch.Tensor:
        """Every block from ``x``; returns the tensor holding the residual stream after the last (``x`` itself
        unless a kernel has no in-place residual add)."""
        b = self.buffers
        product, accumulate = self.products.product, self.products.accumulate
        mark = probe.mark
        o_mark, down_mark = "o_proj+attn_residual", "down_proj+mlp_residual"
        if self.parallel is not None:  # product, all-reduce and add, each marked (``_ReducedAccumulate``)
            accumulate, o_mark, down_mark = _ReducedAccumulate(self, mark), "attn_residual", "mlp_residual"
        x = b.x
        for i, plan in enumerate(b.layers):
            self._norm(x, plan.attn_norm)
            mark("attn_norm", i)
            product(b.qkv, b.h, plan.wqkv, plan.bqkv)
            mark("qkv_proj", i)
            self._rope(plan)
            mark("rope", i)
            self._attend(plan)
            mark("attention", i)
            x = accumulate(x, b.o, plan.wo, plan.bo)  # the residual add rides on the o projection
            mark(o_mark, i)
            self._norm(x, plan.mlp_norm)
            mark("mlp_norm", i)
            product(b.gate_up, b.h, plan.wgate_up, plan.bgate_up)
            mark("gate_up_proj", i)
            self._act()
            mark("act", i)
            x = accumulate(x, b.act, plan.wdown, plan.bdown)
            mark(down_mark, i)
        return x

    def _act(self) -> None:
        """``act`` = silu(gate) · up (``gate`` is overwritten)."""
        b = self.buffers
        F.silu(b.gate, inplace=True)
        torch.mul(b.gate, b.up, out=b.act)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> None:
        """RMSNorm of x (B, d) into ``h`` as ``llmrun.model.transformer.RMSNorm``: float32 statistics, cast, weight."""
        b = self.buffers
        rstd, x32, out = b.rstd, b.x32, b.h
        if x32 is not None:  # bf16/fp16: the statistics and the scaling in float32, as the eager path
            x32.copy_(x)
            x = x32
        torch.linalg.vector_norm(x, 2, dim=-1, keepdim=True, out=rstd)
        torch.addcmul(b.eps, rstd, rstd, value=1 / x.shape[-1], out=rstd)  # mean(x^2) + eps
        rstd.rsqrt_()
        if x32 is None:
            torch.mul(x, rstd, out=out)
        else:
            x32.mul_(rstd)
            out.copy_(x32)
        out.mul_(weight)


class _ReducedAccumulate:
    """A shard's ``accumulate`` for one step: acc (B, d) += (x W^T + b) summed over the ranks.

    Called for o_proj then down_proj of each layer in turn; marks the row-parallel product
    (``o_proj``/``down_proj``) and its all-reduce (``attn_allreduce``/``mlp_allreduce``) apart.
    """

    PRODUCTS, REDUCES = ("o_proj", "down_proj"), ("attn_allreduce", "mlp_allreduce")

    def __init__(self, decoder: FastDecoder, mark) -> None:
        self.decoder, self.mark, self.calls = decoder, mark, 0

    def __call__(self, acc: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        layer, which = divmod(self.calls, 2)
        self.calls += 1
        d = self.decoder
        d.products.product(d.partial, x, w, bias)
        self.mark(self.PRODUCTS[which], layer)
        reduced = d.parallel.all_reduce(d.partial)
        self.mark(self.REDUCES[which], layer)
        return acc.add_(reduced)
