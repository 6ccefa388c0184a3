"""The decode fast path: one token per sequence through preallocated buffers; compiled and graphed on a GPU.

At batch 1 a decode step reads every weight once, so its floor is the time of one pass of
matrix-vector products over the weights (``scripts/bench_decode_floor.py`` measures it). What
the eager path (``llmrun.model.transformer.Block``) adds on top is per-op work: ~50 dispatches per layer, each
allocating its output. ``StaticDecoder`` runs the same math with ~30 dispatches per layer into
buffers allocated once per cache:

* q/k/v and gate/up are one matrix each (``llmrun.model.transformer.fuse_projections``);
* the residual adds ride on the o/down projections (x += o W_o^T in one kernel);
* RoPE is three ops for q and k together (rotate-half is an ``index_select`` with a fixed
  permutation), with 1/sqrt(head_dim) folded into q's cos/sin row, which is built once per step;
* RMSNorm is the eager formula (float32 statistics, cast, then scale) with ``out=`` buffers;
* attention is a grouped matmul over the filled cache, softmax in place, and a matmul with V:
  query head j reads key/value head j // (H / H_kv), as transformers' ``repeat_kv`` does, without
  copying K/V (bf16/fp16 on the CPU: in float32 scratch).

On the CPU the matrix-vector products go through oneDNN on reordered weights (``cpu_gemv``: ~1.7x
the bandwidth of ``torch.mm``/MKL here): its 1x1 convolution in fp32 on AVX-512 CPUs, which adds
into the residual in place, and its linear otherwise, whose outputs are fresh tensors; ``torch.mm``
where oneDNN cannot run the dtype (fp16). ``LLMRUN_CPU_GEMV=mm`` writes
every product into the buffers, and then a step allocates nothing (``tests/test_fastpath.py``
counts the CPU allocator's calls). The position is a Python int and
the cache is sliced to the filled positions. On CUDA the position is a device tensor and attention
covers the whole cache under a mask, so the step has static shapes: it is compiled with
``torch.compile`` and captured once in a CUDA graph that every step replays, with no host-device
synchronisation and no allocation inside a step. The logits a step returns live in a buffer that
the next step overwrites.

The profiler never sees this path: a probe needs the eager ops (``llmrun.model.executor`` runs eager
whenever a probe is given), and ``llmrun bench`` reports this path's speed beside it.
"""

from __future__ import annotations

import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from llmrun.model.fastpath.gemv import PRODUCTS, cpu_gemv
from llmrun.model.kvcache import KVCache
from llmrun.model.transformer import Transformer, fuse_projections

# Keys from which float32 decode attention runs on all threads on the CPU (below, on one, like the other
# small ops). Measured here (bmm, softmax, bmm per layer, 3 K/V heads of 64): equal at 128 keys, 2 threads
# 1.3x faster at 512, 1.45x at 2048 and 6000. bf16/fp16 attention stays on one thread: it multiplies
# float32 copies that the main thread has just written, and a second core reading them was 1.2-1.6x
# slower than one core alone on this VM (and as fast as float32's gain only at some hours: it depends on
# where the hypervisor puts the two vCPUs). See scripts/bench_attention.py.
WIDE_ATTENTION_KEYS = 256


def compile_enabled() -> bool:
    """Whether CUDA decoders compile their step with ``torch.compile``: unless ``LLMRUN_COMPILE=0``."""
    return os.environ.get("LLMRUN_COMPILE", "1") != "0"


def supported(model: Transformer, cache: KVCache) -> bool:
    """Whether ``StaticDecoder`` computes what the eager path does for this model and cache.

    Dynamic NTK RoPE changes every angle once the sequence passes ``max_position_embeddings``;
    the fast path precomputes angles per position, so it declines when the cache could get there.
    """
    args = model.args
    return not (args.rope_type == "dynamic" and cache.max_seq_len > args.max_position_embeddings)


class StaticDecoder:
    """Decode steps for one model and one ``KVCache``, with every buffer allocated here once.

    ``step(token, pos)`` reads token ids (B,) at position ``pos`` and returns logits (B, V)
    float32: a buffer that the next step overwrites (copy it to keep it).

    Modes (defaults: all three on CUDA, none on the CPU): ``static`` takes the position as a
    device tensor and attends over the whole cache under a mask, so every step has the same
    shapes; ``compile`` runs that step through ``torch.compile`` (``LLMRUN_COMPILE=0`` turns it
    off); ``graph`` captures it in a CUDA graph and replays it. ``prepare_s`` is the seconds spent
    building, compiling and capturing, which callers report apart from any token's latency.
    ``gemv`` picks the CPU matrix-vector kernel (``cpu_gemv``; default: ``LLMRUN_CPU_GEMV``); CUDA
    and static steps always use ``torch.mm``.
    """

    def __init__(
        self,
        model: Transformer,
        cache: KVCache,
        *,
        graph: bool | None = None,
        compile: bool | None = None,
        static: bool | None = None,
        gemv: str | None = None,
    ) -> None:
        t0 = time.perf_counter()
        fuse_projections(model)
        self.model, self.cache = model, cache
        args = model.args
        embed = model.model.embed_tokens.weight
        device, dtype = embed.device, embed.dtype
        k0 = cache.layers[0].k
        b, n_kv, s_max, hd = k0.shape
        h = args.num_attention_heads
        self.batch, self.max_seq_len = b, s_max
        cuda = device.type == "cuda"
        self.graphed = cuda if graph is None else graph
        if self.graphed and not cuda:
            raise ValueError("CUDA graphs need a CUDA device")
        self.compiled = (cuda and compile_enabled()) if compile is None else compile
        self.compile_error: str | None = None
        # Static shapes (a CUDA graph, torch.compile): the position is a tensor and attention covers the
        # whole cache under a mask. Otherwise the position is a Python int and the cache is sliced.
        self.static = self.graphed or self.compiled or bool(static)
        empty = _Allocator(device, dtype)
        d, f, v = args.hidden_size, args.intermediate_size, args.vocab_size
        group = h // n_kv
        self.x, self.h = empty(b, d), empty(b, d)
        self.rstd = empty(b, 1, dtype=torch.float32)
        self.x32 = empty(b, d, dtype=torch.float32) if dtype != torch.float32 else None
        self.eps = torch.tensor(args.rms_norm_eps, dtype=torch.float32, device=device)
        qkv = empty(b, (h + 2 * n_kv) * hd)
        self.qkv = qkv
        self.qk_in = qkv[:, : (h + n_kv) * hd].view(b, h + n_kv, hd)  # (B, H+Hkv, D), rows (H+2Hkv)·D apart
        self.v_new = qkv[:, (h + n_kv) * hd :].view(b, n_kv, 1, hd)  # (B, Hkv, 1, D)
        self.rotated = empty(b, h + n_kv, hd)
        self.qk = empty(b, h + n_kv, hd)
        self.q = self.qk[:, :h].view(b, n_kv, group, hd)  # query head j = kv head j // group
        self.k_new = self.qk[:, h:].view(b, n_kv, 1, hd)
        # CPU attention in bf16/fp16 runs in float32 (bf16 bmm copies K^T and is ~2x slower than copying
        # K and V to float32 and multiplying there; its scores would also be rounded to bf16).
        attn32 = dtype != torch.float32 and not cuda
        self.scores = empty(b * n_kv * group * s_max, dtype=torch.float32 if attn32 else dtype)
        head_shape = (n_kv,) if b == 1 else (b, n_kv)
        self.attn32 = (
            (
                empty(*head_shape, s_max, hd, dtype=torch.float32),
                empty(*head_shape, s_max, hd, dtype=torch.float32),
                empty(*head_shape, group, hd, dtype=torch.float32),
                empty(*head_shape, group, hd, dtype=torch.float32),
            )
            if attn32
            else None
        )
        self.o = empty(b, h * hd)
        self.o4 = self.o.view(b, n_kv, group, hd)
        self.gate_up = empty(b, 2 * f)
        self.gate, self.up = self.gate_up[:, :f], self.gate_up[:, f:]
        self.act = empty(b, f)  # silu(gate) * up, contiguous: the down projection's input
        self.logits = torch.empty(b, v, dtype=torch.float32, device=device)
        self._logits_mm = self.logits if dtype == torch.float32 else empty(b, v)
        # RoPE: cos/sin (S_max, D) per position; q's rows carry the 1/sqrt(D) attention scale.
        cos, sin = model.rotary.angles(0, s_max, device, dtype)
        half = hd // 2
        sign = torch.ones(hd, dtype=dtype, device=device)
        sign[:half] = -1
        self.cos_table, self.sin_table = cos, sin * sign  # rotate_half(x) * sin == x[perm] * (sin * sign)
        self.perm = torch.arange(hd, device=device).roll(half)
        scale = torch.ones(h + n_kv, 1, dtype=dtype, device=device)
        scale[:h] = 1 / math.sqrt(hd)
        self.head_scale = scale
        self.cos, self.sin = empty(h + n_kv, hd), empty(h + n_kv, hd)
        self.gemv = "mm" if cuda or self.static else cpu_gemv(dtype, gemv)
        self.products = PRODUCTS[self.gemv](b)
        pack = self.products.pack
        self.layers = [_LayerPlan(block, cache.layers[i], pack) for i, block in enumerate(model.model.layers)]
        # At batch 1 attention is a 3-d bmm per layer (no reshapes); above, a 4-d matmul.
        self.attn_matmul = torch.bmm if b == 1 else torch.matmul
        self.scores_shape = (n_kv, group) if b == 1 else (b, n_kv, group)
        self.scores_per_key = b * n_kv * group
        self.q_attn = self.q[0] if b == 1 else self.q
        self.o_attn = self.o4[0] if b == 1 else self.o4
        # On the CPU attention is bmm, softmax, bmm over the filled positions (in float32; see attn32):
        # SDPA's flash kernel costs more at T=1 (67 vs ~25 µs per layer at 65 keys in bf16, 635 vs ~105
        # at 640). Static shapes (CUDA graphs, torch.compile) take SDPA over the whole cache under a mask.
        self.sdpa = self.static
        self.lm_head = pack(model.lm_head.weight)
        self.products.keep(self.x, self.h, self.qkv, self.o, self.gate_up, self.act, self._logits_mm)
        self.narrow_small_ops = True  # run the small ops on one thread (see _run)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.token = torch.zeros(b, dtype=torch.long, device=device)
        if self.static:
            self.positions = torch.arange(s_max, device=device)
            windows = {plan.window for plan in self.layers}
            self.masked = {w: torch.empty(s_max, dtype=torch.bool, device=device) for w in windows}
            self.bias = {w: empty(1, s_max) for w in windows}  # additive mask: 0 where attended, -inf elsewhere
            self._static_run = self._compile() if self.compiled else self._run_static
            if self.graphed:
                self._graph = self._capture()
        self.prepare_s = time.perf_counter() - t0

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Token ids (B,) or (B, 1) at position ``cache.length`` -> logits (B, V) float32 (a reused buffer).

        The cache grows by one position.
        """
        pos = self.cache.reserve(1)
        self.pos.fill_(pos)
        if self._graph is not None:
            self.token.copy_(token.view(-1))
            self._graph.replay()
        elif self.static:
            self.token.copy_(token.view(-1))
            self._static_run()
        else:
            self._run(token.view(-1), pos)
        self.cache.length = pos + 1
        return self.logits

    _graph: torch.cuda.CUDAGraph | None = None

    def _run_static(self) -> None:
        self._run(self.token, None)

    def _compile(self):
        """``torch.compile`` of the static step (fusing the small ops into few kernels), compiled now.

        Compilation happens here, inside ``prepare_s``, never in a token's latency. Where it fails
        (no compiler toolchain, an unsupported op), the step stays eager and ``compile_error`` says why.
        """
        compiled = torch.compile(self._run_static, fullgraph=True, dynamic=False)
        self.pos.fill_(self.max_seq_len - 1)
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
            return self._run_static
        return compiled

    def _capture(self) -> torch.cuda.CUDAGraph:
        """Warm up on a side stream, then record one step into a CUDA graph.

        The warm-up and capture write the last cache slot; a decode at that position writes it
        again before reading it, and masked positions never contribute, so nothing leaks.
        """
        self.pos.fill_(self.max_seq_len - 1)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):
                self._static_run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            self._static_run()
        torch.cuda.synchronize()
        return graph

    def _run(self, token: torch.Tensor, pos: int | None) -> None:
        """The step itself. ``pos`` None: attend over the whole cache under a mask built from ``self.pos``.

        On a CPU with several threads, only the matrix-vector products (and float32 attention over at
        least ``WIDE_ATTENTION_KEYS`` keys) run on all of them: for the small ops a parallel region costs
        more than their work (and, on a shared machine, waits for a descheduled thread), so they run
        on one. Switching costs ~0.2 µs.
        """
        model = self.model
        x, h = self.x, self.h
        narrow = self.narrow_small_ops and self.x.device.type == "cpu" and not self.static
        threads = torch.get_num_threads() if narrow else 1
        one = threads if threads == 1 else 1
        set_threads = torch.set_num_threads if threads > 1 else _no_op
        set_threads(one)
        torch.index_select(model.model.embed_tokens.weight, 0, token, out=x)
        if pos is None:
            torch.mul(self.cos_table.index_select(0, self.pos), self.head_scale, out=self.cos)
            torch.mul(self.sin_table.index_select(0, self.pos), self.head_scale, out=self.sin)
            for window, masked in self.masked.items():
                torch.gt(self.positions, self.pos, out=masked)
                if window is not None:
                    masked.logical_or_(self.positions <= self.pos - window)
                self.bias[window].zero_().masked_fill_(masked, float("-inf"))
            end = self.max_seq_len
        else:
            torch.mul(self.cos_table[pos], self.head_scale, out=self.cos)
            torch.mul(self.sin_table[pos], self.head_scale, out=self.sin)
            end = pos + 1
        bmm, q, o = self.attn_matmul, self.q_attn, self.o_attn
        product, accumulate = self.products.product, self.products.accumulate
        spans: dict[int | None, tuple] = {}  # window -> views of the scratch buffers for this step's key span
        for plan in self.layers:
            self._norm(x, plan.attn_norm, h)
            set_threads(threads)
            product(self.qkv, h, plan.wqkv, plan.bqkv)
            set_threads(one)
            torch.index_select(self.qk_in, -1, self.perm, out=self.rotated)
            self.rotated.mul_(self.sin)
            torch.addcmul(self.rotated, self.qk_in, self.cos, out=self.qk)
            plan.k.index_copy_(2, self.pos, self.k_new)
            plan.v.index_copy_(2, self.pos, self.v_new)
            start = 0 if plan.window is None or pos is None else max(0, end - plan.window)
            if self.attn32 is None and end - start >= WIDE_ATTENTION_KEYS:  # long spans: real work
                set_threads(threads)
            if self.sdpa:  # the G query heads of a K/V head as G queries: GQA without repeating K/V
                mask = None if pos is not None else self.bias[plan.window]
                attended = F.scaled_dot_product_attention(
                    self.q, plan.k[:, :, start:end], plan.v[:, :, start:end], attn_mask=mask, scale=1.0
                )
                self.o4.copy_(attended)
            else:
                views = spans.get(plan.window)
                if views is None:  # shared by every layer with this window: made once per step
                    views = spans[plan.window] = self._span_views(end - start)
                scores, k32, v32 = views
                if self.attn32 is None:
                    bmm(q, plan.k_t[..., start:end], out=scores)
                    torch._softmax(scores, -1, False, out=scores)  # in place: the scores become the weights
                    bmm(scores, plan.v_attn[..., start:end, :], out=o)
                else:  # bf16/fp16: K, V and q copied to float32 scratch, then the float32 steps above
                    q32, o32 = self.attn32[2:]
                    k32.copy_(plan.k_attn[..., start:end, :])
                    v32.copy_(plan.v_attn[..., start:end, :])
                    q32.copy_(q)
                    bmm(q32, k32.transpose(-1, -2), out=scores)
                    torch._softmax(scores, -1, False, out=scores)
                    bmm(scores, v32, out=o32)
                    o.copy_(o32)
            set_threads(threads)
            x = accumulate(x, self.o, plan.wo, plan.bo)
            set_threads(one)
            self._norm(x, plan.mlp_norm, h)
            set_threads(threads)
            product(self.gate_up, h, plan.wgate_up, plan.bgate_up)
            set_threads(one)
            torch.nn.functional.silu(self.gate, inplace=True)
            torch.mul(self.gate, self.up, out=self.act)
            set_threads(threads)
            x = accumulate(x, self.act, plan.wdown, plan.bdown)
            set_threads(one)
        self._norm(x, model.model.norm.weight, h)
        set_threads(threads)
        product(self._logits_mm, h, self.lm_head, None)
        if self._logits_mm is not self.logits:
            self.logits.copy_(self._logits_mm)

    def _span_views(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Scores ([B,] Hkv, G, n) and, in bf16/fp16, float32 K and V scratch ([B,] Hkv, n, D) for n keys."""
        scores = self.scores[: self.scores_per_key * n].view(*self.scores_shape, n)
        if self.attn32 is None:
            return scores, None, None
        return scores, self.attn32[0][..., :n, :], self.attn32[1][..., :n, :]

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
        """RMSNorm as ``llmrun.model.transformer.RMSNorm``: float32 statistics, cast to the model dtype, then the weight."""
        rstd, x32 = self.rstd, self.x32
        if x32 is not None:  # bf16/fp16: the statistics and the scaling in float32, as the eager path
            x32.copy_(x)
            x = x32
        torch.linalg.vector_norm(x, 2, dim=-1, keepdim=True, out=rstd)
        torch.addcmul(self.eps, rstd, rstd, value=1 / x.shape[-1], out=rstd)  # mean(x^2) + eps
        rstd.rsqrt_()
        if x32 is None:
            torch.mul(x, rstd, out=out)
        else:
            x32.mul_(rstd)
            out.copy_(x32)
        out.mul_(weight)


class _LayerPlan:
    """One block's weights (as the step's ``_Products`` multiply by them) and its cache buffers."""

    def __init__(self, block, layer_cache, pack) -> None:
        attn, mlp = block.self_attn, block.mlp
        self.window = attn.window
        self.attn_norm = block.input_layernorm.weight
        self.mlp_norm = block.post_attention_layernorm.weight
        self.wqkv, self.bqkv = pack(attn.wqkv), attn.bqkv
        self.wo, self.bo = pack(attn.o_proj.weight), attn.o_proj.bias
        self.wgate_up, self.bgate_up = pack(mlp.wgate_up), mlp.bgate_up
        self.wdown, self.bdown = pack(mlp.down_proj.weight), mlp.down_proj.bias
        self.k, self.v = layer_cache.k, layer_cache.v  # (B, Hkv, S_max, D)
        batch = layer_cache.k.shape[0]
        k, v = (layer_cache.k[0], layer_cache.v[0]) if batch == 1 else (layer_cache.k, layer_cache.v)
        self.k_t = k.transpose(-1, -2)  # ([B,] Hkv, D, S_max)
        self.k_attn, self.v_attn = k, v  # ([B,] Hkv, S_max, D)


def _no_op(_: int) -> None:
    return None


class _Allocator:
    """``torch.empty`` on one device in one dtype (another dtype when asked)."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype

    def __call__(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.empty(*shape, device=self.device, dtype=dtype or self.dtype)
