"""The Llama-family decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Follows Meta's llama3 ``model.py`` and Hugging Face's ``modeling_llama.py`` (the reference the
tests compare against), with module attributes named like the checkpoint keys
(``model.layers.0.self_attn.q_proj``) so that loading is a direct mapping. Qwen2 (bias on q/k/v)
and Mistral are the same graph with other constants.

The layer loop lives in ``llmrun.model.executor``; a ``Block`` computes one layer and marks each named
op on the probe it is given (see ``llmrun.model.probe``). Nothing here times anything.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmrun.model.attention import attend
from llmrun.model.config import ModelArgs
from llmrun.model.fused import FUSED_PROJECTIONS
from llmrun.model.kvcache import LayerCache
from llmrun.model.parallel import Collectives
from llmrun.model.probe import Probe
from llmrun.model.quant import QuantLinear, fuse_quantized, product
from llmrun.model.rope import Rotary, apply_rope


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and cast back (as Hugging Face does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention projections (q, k, v, o)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        d, hd = args.hidden_size, args.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, hd
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=args.attention_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=args.attention_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=args.attention_bias)
        o_bias = args.attention_bias and args.model_type == "llama"
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=o_bias)
        self.split_sizes = (self.n_heads * hd, self.n_kv_heads * hd, self.n_kv_heads * hd)
        self.window: int | None = None  # sliding attention window in tokens (set by Block), None for full
        self.prefill_kernel = "sdpa"  # CPU prefill's attention kernel (``Transformer.prefill_attention``)
        # Set by ``fuse_projections``: one (h+2k)·hd × d matrix whose row blocks are q_proj, k_proj and
        # v_proj's weights (those parameters become views of it). Plain attributes, not parameters,
        # so that ``parameters()`` still counts every weight once.
        self.wqkv: torch.Tensor | None = None
        self.bqkv: torch.Tensor | None = None


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        d, f = args.hidden_size, args.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=args.mlp_bias)
        self.up_proj = nn.Linear(d, f, bias=args.mlp_bias)
        self.down_proj = nn.Linear(f, d, bias=args.mlp_bias)
        # Set by ``fuse_projections``: gate_proj and up_proj's weights stacked into one 2f × d matrix.
        self.wgate_up: torch.Tensor | None = None
        self.bgate_up: torch.Tensor | None = None


class Block(nn.Module):
    """One decoder layer: pre-norm attention and pre-norm MLP, each with a residual."""

    def __init__(self, args: ModelArgs, index: int) -> None:
        super().__init__()
        self.index = index
        # Set on a tensor-parallel rank's shard (``llmrun.model.parallel``): sums the row-parallel
        # o_proj and down_proj products over the ranks; None on one device.
        self.parallel: Collectives | None = None
        self.self_attn = Attention(args)
        self.self_attn.window = args.attention_windows()[index]
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        start: int,
        cache: LayerCache | None,
        probe: Probe,
        padding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, d) at positions start..start+T-1 -> (B, T, d); writes K/V into ``cache``.

        ``rope`` is the (cos, sin) pair from ``Rotary.angles`` for those positions; ``padding`` (B,)
        the left-padded positions of each row, which attention masks out (None: no row is padded).
        """
        i, attn, mlp = self.index, self.self_attn, self.mlp
        b, t, _ = x.shape
        with probe.region("attn_norm", i):
            h = self.input_layernorm(x)
        with probe.region("qkv_proj", i):
            if attn.wqkv is not None:
                q, k, v = product(h, attn.wqkv, attn.bqkv).split(attn.split_sizes, dim=-1)
            else:
                q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
            q = q.view(b, t, attn.n_heads, attn.head_dim).transpose(1, 2)  # (B, H, T, D)
            k = k.view(b, t, attn.n_kv_heads, attn.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
            v = v.view(b, t, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
        with probe.region("rope", i):
            q, k = apply_rope(q, k, *rope)
        with probe.region("attention", i):
            o = attend(q, k, v, start, cache, window=attn.window, padding=padding, kernel=attn.prefill_kernel)
        with probe.region("o_proj", i):
            o = attn.o_proj(o.transpose(1, 2).reshape(b, t, attn.n_heads * attn.head_dim))
        if self.parallel is not None:
            with probe.region("attn_allreduce", i):
                o = self.parallel.all_reduce(o)
        with probe.region("attn_residual", i):
            x = x + o
        with probe.region("mlp_norm", i):
            h = self.post_attention_layernorm(x)
        with probe.region("gate_up_proj", i):
            if mlp.wgate_up is not None:
                gate, up = product(h, mlp.wgate_up, mlp.bgate_up).chunk(2, dim=-1)  # (B, T, f) each
            else:
                gate, up = mlp.gate_proj(h), mlp.up_proj(h)
        with probe.region("act", i):
            h = F.silu(gate) * up
        with probe.region("down_proj", i):
            h = mlp.down_proj(h)
        if self.parallel is not None:
            with probe.region("mlp_allreduce", i):
                h = self.parallel.all_reduce(h)
        with probe.region("mlp_residual", i):
            return x + h


class Decoder(nn.Module):
    """Embedding, blocks and final norm: the checkpoint's ``model.*`` tensors."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        # An explicit (uninitialised) weight skips Embedding's normal_ init, which on the meta device imports
        # torch._dynamo, seconds of start-up and exit. Checkpoints overwrite it anyway.
        empty = torch.empty(args.vocab_size, args.hidden_size)
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size, _weight=empty)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Transformer(nn.Module):
    """Decoder plus lm_head; ``lm_head.weight`` is the embedding when embeddings are tied."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        # The shapes of this process's modules: ``args`` itself, or one tensor-parallel rank's share
        # (``llmrun.model.parallel``), where ``args`` stays the whole model's and ``parallel`` is set.
        self.local_args = args
        self.parallel: Collectives | None = None
        self.model = Decoder(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rotary = Rotary(args)
        # The CPU matrix-vector kernel of this model's fast decode (a ``llmrun.model.fastpath.gemv``
        # name), set by whoever measured the candidates (``llmrun.profiler.tuning``); None: not measured.
        self.decode_gemv: str | None = None
        self.tie_weights()

    @property
    def prefill_attention(self) -> str:
        """CPU prefill's attention kernel in every layer (``llmrun.model.attention.PREFILL_KERNELS``): ``sdpa``
        unless set by whoever measured the two (``llmrun.profiler.attention_tuning``)."""
        layers = self.model.layers
        return layers[0].self_attn.prefill_kernel if len(layers) else "sdpa"

    @prefill_attention.setter
    def prefill_attention(self, kernel: str) -> None:
        for block in self.model.layers:
            block.self_attn.prefill_kernel = kernel

    def tie_weights(self) -> None:
        """With tied embeddings, make ``lm_head.weight`` the embedding matrix itself (after loading new tensors)."""
        if self.args.tie_word_embeddings:
            embed = self.model.embed_tokens.weight
            if isinstance(embed, torch.Tensor):
                self.lm_head.weight = embed
            else:  # a quantized embedding: the lm_head multiplies by the same codes
                self.lm_head = QuantLinear(embed)

    def expected_tensors(self) -> dict[str, torch.Size]:
        """Checkpoint names and shapes this model needs (a tied lm_head is not stored)."""
        shapes = {name: p.shape for name, p in self.named_parameters(remove_duplicate=False)}
        return {name: shape for name, shape in shapes.items() if not self.ignores_tensor(name)}

    def ignores_tensor(self, name: str) -> bool:
        """Whether a checkpoint tensor of this name carries nothing the model needs: a tied lm_head
        (the embedding stands in for it) or the rotary tables some exporters store."""
        return name.endswith("rotary_emb.inv_freq") or (self.args.tie_word_embeddings and name == "lm_head.weight")


def fuse_projections(
    model: Transformer, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Give every block one matrix for q/k/v (``wqkv``) and one for gate/up (``wgate_up``), in place.

    One matrix-vector product over a fused matrix costs one kernel launch instead of three (or two),
    which is most of what decode at batch 1 spends beyond reading the weights. The per-projection
    parameters (``q_proj.weight``, ...) become row-block views of the fused matrix: their names,
    shapes and values are unchanged and nothing is stored twice. Values already present are copied
    in; a model built on the meta device gets uninitialised storage on ``device`` in ``dtype``, for
    the loader to fill through the returned views. Blocks already fused are left alone.

    Returns checkpoint name -> view (``model.layers.0.self_attn.q_proj.weight``, ...) of every
    parameter that now lives inside a fused matrix.
    """
    views: dict[str, torch.Tensor] = {}
    for i, block in enumerate(model.model.layers):
        for owner_name, weight_attr, bias_attr, parts in FUSED_PROJECTIONS:
            owner = getattr(block, owner_name)
            if getattr(owner, weight_attr) is not None:
                continue
            linears = [getattr(owner, name) for name in parts]
            if any(isinstance(lin, QuantLinear) for lin in linears):
                whole, modules = fuse_quantized(linears)
                setattr(owner, weight_attr, whole.weight)
                setattr(owner, bias_attr, whole.bias)
                for name, module in zip(parts, modules, strict=True):
                    setattr(owner, name, module)
                continue
            ref = linears[0].weight
            target = {
                "device": device or ref.device,
                "dtype": dtype or ref.dtype,
            }
            rows = sum(lin.out_features for lin in linears)
            weight = torch.empty(rows, linears[0].in_features, **target)
            bias = torch.empty(rows, **target) if linears[0].bias is not None else None
            row = 0
            for name, lin in zip(parts, linears, strict=True):
                prefix = f"model.layers.{i}.{owner_name}.{name}"
                span = slice(row, row + lin.out_features)
                views[f"{prefix}.weight"] = _adopt(lin, "weight", weight[span])
                if bias is not None:
                    views[f"{prefix}.bias"] = _adopt(lin, "bias", bias[span])
                row += lin.out_features
            setattr(owner, weight_attr, weight)
            setattr(owner, bias_attr, bias)
    return views


def _adopt(module: nn.Module, name: str, view: torch.Tensor) -> torch.Tensor:
    """Copy ``module.name`` into ``view`` (unless it is on the meta device) and make the parameter that view."""
    old = getattr(module, name)
    if not old.is_meta:
        view.copy_(old)
    setattr(module, name, nn.Parameter(view, requires_grad=False))
    return view
