"""The tensors a fast decode step writes, allocated once per (model, cache), and each layer's plan."""

from __future__ import annotations

import math
import operator

import torch

from llmrun.model.kvcache import KVCache, LayerCache
from llmrun.model.transformer import Block, Transformer


class DecodeBuffers:
    """Every tensor a decode step writes, for one (fused) model and one ``KVCache`` of batch B.

    Shapes: d hidden size, f intermediate size, V vocabulary, S_max cache positions, D head_dim,
    H query heads, Hkv key/value heads, G = H / Hkv query heads per key/value head.

    * ``x`` (B, d): the residual stream; ``h`` (B, d): its normalised copy, every product's input;
      ``rstd`` (B, 1) float32 and, in bf16/fp16, ``x32`` (B, d) float32: RMSNorm's statistics;
    * ``qkv`` (B, (H+2Hkv)·D): the fused q/k/v product; ``qk_in`` (B, H+Hkv, D) its q and k rows,
      ``v_new`` (B, Hkv, 1, D) its v rows; ``rotated`` and ``qk`` (B, H+Hkv, D): RoPE's scratch and
      result, seen as ``q`` (B, Hkv, G, D) (query head j reads key/value head j // G) and ``k_new``
      (B, Hkv, 1, D);
    * ``o`` (B, H·D): attention's output, seen as ``o4`` (B, Hkv, G, D);
    * ``gate_up`` (B, 2f) with views ``gate`` and ``up``; ``act`` (B, f): silu(gate) · up;
    * ``logits`` (B, V) float32; ``logits_mm``: the lm_head's output in the model dtype (``logits`` in fp32);
    * ``cos_table``, ``sin_table`` (S_max, D): RoPE per position, the sine signed so that
      rotate_half(x) · sin == x[..., perm] · sin_table; ``perm`` (D,); ``head_scale`` (H+Hkv, 1):
      1/sqrt(D) on q's rows, 1 on k's; ``cos``, ``sin`` (H+Hkv, D): this step's angles times it;
    * ``pos`` (1,) int64: the step's position, where the new k and v go;
    * ``q_heads``, ``o_heads`` and each plan's ``k_t``, ``k_heads``, ``v_heads``: the operands of
      sliced attention, ([B,] Hkv, ...) without the batch dimension at B=1, and ``matmul`` that
      multiplies them: a 3-d ``bmm`` at B=1 (a 4-d matmul costs extra dispatches), else ``matmul``;
    * the weights as ``products`` multiplies by them: ``layers`` (one ``LayerPlan`` per block),
      ``lm_head`` (float or quantized, ``llmrun.model.quant``); and ``embed`` (read by ``lookup``),
      ``final_norm``, ``eps``.
    """

    def __init__(self, model: Transformer, cache: KVCache, products) -> None:
        args = model.local_args  # one rank's shapes on a tensor-parallel shard
        embed = model.model.embed_tokens.weight
        self.device, self.dtype = embed.device, embed.dtype
        b, n_kv, s_max, hd = cache.layers[0].k.shape
        h, d, f = args.num_attention_heads, args.hidden_size, args.intermediate_size
        group = h // n_kv
        self.embed, self.final_norm = embed, model.model.norm.weight
        self.eps = torch.tensor(args.rms_norm_eps, dtype=torch.float32, device=self.device)
        self.x, self.h = self.empty(b, d), self.empty(b, d)
        self.rstd = self.empty(b, 1, dtype=torch.float32)
        self.x32 = self.empty(b, d, dtype=torch.float32) if self.dtype != torch.float32 else None
        self.qkv = self.empty(b, (h + 2 * n_kv) * hd)
        self.qk_in = self.qkv[:, : (h + n_kv) * hd].view(b, h + n_kv, hd)  # rows (H+2Hkv)·D apart
        self.v_new = self.qkv[:, (h + n_kv) * hd :].view(b, n_kv, 1, hd)
        self.rotated, self.qk = self.empty(b, h + n_kv, hd), self.empty(b, h + n_kv, hd)
        self.q = self.qk[:, :h].view(b, n_kv, group, hd)
        self.k_new = self.qk[:, h:].view(b, n_kv, 1, hd)
        self.o = self.empty(b, h * hd)
        self.o4 = self.o.view(b, n_kv, group, hd)
        self.gate_up = self.empty(b, 2 * f)
        self.gate, self.up = self.gate_up[:, :f], self.gate_up[:, f:]
        self.act = self.empty(b, f)  # contiguous: the down projection's input
        self.logits = self.empty(b, args.vocab_size, dtype=torch.float32)
        self.logits_mm = self.logits if self.dtype == torch.float32 else self.empty(b, args.vocab_size)
        self._rope_tables(model, s_max, h, n_kv, hd)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        heads = operator.itemgetter(0) if b == 1 else _same
        self.matmul = torch.bmm if b == 1 else torch.matmul
        self.q_heads, self.o_heads = heads(self.q), heads(self.o4)
        self.layers = [
            LayerPlan(block, cache.layers[i], products.pack, heads) for i, block in enumerate(model.model.layers)
        ]
        self.lm_head = products.pack(model.lm_head.weight)
        products.keep(self.x, self.h, self.qkv, self.o, self.gate_up, self.act, self.logits_mm)

    def lookup(self, token: torch.Tensor) -> None:
        """The embedding rows of token ids (B,) into ``x`` (a quantized embedding dequantizes those rows only)."""
        if isinstance(self.embed, torch.Tensor):
            torch.index_select(self.embed, 0, token, out=self.x)
        else:
            self.x.copy_(self.embed.dequantize(self.dtype, token))

    def empty(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A new uninitialised tensor on the model's device, in the model's dtype unless ``dtype`` says otherwise."""
        return torch.empty(*shape, device=self.device, dtype=dtype or self.dtype)

    def _rope_tables(self, model: Transformer, s_max: int, h: int, n_kv: int, hd: int) -> None:
        cos, sin = model.rotary.angles(0, s_max, self.device, self.dtype)
        half = hd // 2
        sign = torch.ones(hd, dtype=self.dtype, device=self.device)
        sign[:half] = -1
        self.cos_table, self.sin_table = cos, sin * sign
        self.perm = torch.arange(hd, device=self.device).roll(half)
        self.head_scale = torch.ones(h + n_kv, 1, dtype=self.dtype, device=self.device)
        self.head_scale[:h] = 1 / math.sqrt(hd)
        self.cos, self.sin = self.empty(h + n_kv, hd), self.empty(h + n_kv, hd)


class LayerPlan:
    """One block's weights, as the step's products multiply by them (``pack``), and its cache buffers.

    ``k``, ``v`` (B, Hkv, S_max, D) are the cache itself; ``k_heads``, ``v_heads`` the same as
    ``heads`` shapes attention's operands (``DecodeBuffers``), and ``k_t`` (..., D, S_max) K transposed.
    """

    def __init__(self, block: Block, layer_cache: LayerCache, pack, heads) -> None:
        attn, mlp = block.self_attn, block.mlp
        self.window = attn.window
        self.attn_norm = block.input_layernorm.weight
        self.mlp_norm = block.post_attention_layernorm.weight
        self.wqkv, self.bqkv = pack(attn.wqkv), attn.bqkv
        self.wo, self.bo = pack(attn.o_proj.weight), attn.o_proj.bias
        self.wgate_up, self.bgate_up = pack(mlp.wgate_up), mlp.bgate_up
        self.wdown, self.bdown = pack(mlp.down_proj.weight), mlp.down_proj.bias
        self.k, self.v = layer_cache.k, layer_cache.v
        self.k_heads, self.v_heads = heads(layer_cache.k), heads(layer_cache.v)
        self.k_t = self.k_heads.transpose(-1, -2)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t
