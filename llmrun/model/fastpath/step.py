"""The decode step both fast decoders run: everything but where the position comes from and attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmrun.model.fastpath.buffers import DecodeBuffers, LayerPlan
from llmrun.model.kvcache import KVCache
from llmrun.model.transformer import Transformer, fuse_projections


class FastDecoder:
    """Decode steps for one model and one ``KVCache`` through ``DecodeBuffers`` allocated once.

    ``step(token)`` reads token ids (B,) or (B, 1) at position ``cache.length`` and returns logits
    (B, V) float32: a buffer that the next step overwrites (copy it to keep it). Subclasses
    (``CpuDecoder``, ``StaticDecoder``) give ``_step(token, pos)``, which starts the step (``_begin``)
    and runs ``_layers``, and ``_attend(plan)``, attention of the rotated q over one layer's cache.
    ``products`` multiplies activations by the packed weights (``llmrun.model.fastpath.gemv``).
    """

    def __init__(self, model: Transformer, cache: KVCache, products) -> None:
        fuse_projections(model)
        self.model, self.cache, self.products = model, cache, products
        self.buffers = DecodeBuffers(model, cache, products)

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Token ids (B,) or (B, 1) at position ``cache.length`` -> logits (B, V) float32 (a reused buffer).

        The cache grows by one position.
        """
        pos = self.cache.reserve(1)
        self.buffers.pos.fill_(pos)
        self._step(token.view(-1), pos)
        self.cache.length = pos + 1
        return self.buffers.logits

    def _step(self, token: torch.Tensor, pos: int) -> None:
        raise NotImplementedError

    def _attend(self, plan: LayerPlan) -> None:
        """Attention of ``buffers.q`` over ``plan``'s cache (this step's k and v written) into ``buffers.o``."""
        raise NotImplementedError

    def _begin(self, token: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Embed token ids (B,) into ``x``; scale this step's angles cos, sin (1, D) or (D,) per head."""
        b = self.buffers
        torch.index_select(b.embed, 0, token, out=b.x)
        torch.mul(cos, b.head_scale, out=b.cos)
        torch.mul(sin, b.head_scale, out=b.sin)

    def _layers(self) -> None:
        """Every block from ``x``, then the final norm and the lm_head into ``logits``."""
        b = self.buffers
        product, accumulate = self.products.product, self.products.accumulate
        x = b.x
        for plan in b.layers:
            self._norm(x, plan.attn_norm)
            product(b.qkv, b.h, plan.wqkv, plan.bqkv)
            # RoPE on q and k together: x · cos + rotate_half(x) · sin
            torch.index_select(b.qk_in, -1, b.perm, out=b.rotated)
            b.rotated.mul_(b.sin)
            torch.addcmul(b.rotated, b.qk_in, b.cos, out=b.qk)
            plan.k.index_copy_(2, b.pos, b.k_new)
            plan.v.index_copy_(2, b.pos, b.v_new)
            self._attend(plan)
            x = accumulate(x, b.o, plan.wo, plan.bo)  # the residual add rides on the o projection
            self._norm(x, plan.mlp_norm)
            product(b.gate_up, b.h, plan.wgate_up, plan.bgate_up)
            F.silu(b.gate, inplace=True)
            torch.mul(b.gate, b.up, out=b.act)
            x = accumulate(x, b.act, plan.wdown, plan.bdown)
        self._norm(x, b.final_norm)
        product(b.logits_mm, b.h, b.lm_head, None)
        if b.logits_mm is not b.logits:
            b.logits.copy_(b.logits_mm)

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
