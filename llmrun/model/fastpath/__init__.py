"""The decode fast path: one token per sequence through preallocated buffers; compiled and graphed on a GPU.

At batch 1 a decode step reads every weight once, so its floor is the time of one pass of
matrix-vector products over the weights (``scripts/bench_decode_floor.py`` measures it). What
the eager path (``llmrun.model.transformer.Block``) adds on top is per-op work: ~50 dispatches per
layer, each allocating its output. The fast path runs the same math with ~30 dispatches per layer
into buffers allocated once per cache (``buffers.DecodeBuffers``), in one step body
(``step.FastDecoder``):

* q/k/v and gate/up are one matrix each (``llmrun.model.transformer.fuse_projections``);
* the residual adds ride on the o/down projections (x += o W_o^T in one kernel);
* RoPE is three ops for q and k together (rotate-half is an ``index_select`` with a fixed
  permutation), with 1/sqrt(head_dim) folded into q's cos/sin rows, built once per step;
* RMSNorm is the eager formula (float32 statistics, cast, then scale) with ``out=`` buffers;
* attention is grouped: query head j reads key/value head j // (H / H_kv), as transformers'
  ``repeat_kv`` does, without copying K/V.

Two decoders share that body. ``cpu.CpuDecoder`` takes the position as a Python int and attends over
the filled span of the cache only; its matrix-vector products go through the kernel measured fastest
for the model on this CPU (``gemv.cpu_gemv``, ``llmrun.profiler.tuning``), and with
``LLMRUN_CPU_GEMV=mm`` every product lands in the buffers, so that a step allocates nothing
(``tests/test_fastpath.py`` counts the CPU allocator's calls). ``static.StaticDecoder`` (CUDA) takes
the position as a device tensor and attends under a mask over the shortest of a few power-of-two
spans of the cache that holds the filled positions, so each span's step has static shapes: it is
compiled with ``torch.compile`` and captured in one CUDA graph per span, which every step in that
span replays, with no host-device synchronisation and no allocation inside a step. The logits a step
returns live in a buffer that the next step overwrites.

``decode_step`` with a probe runs the eager ops, one region each; ``FastDecoder.step(token, probe)``
runs this path with the probe marking the end of each op group (``Probe.mark``, a no-op by
default), which is how ``llmrun profile`` times what generate runs (``llmrun.profiler.steps``).
"""

from __future__ import annotations

import os
import time

from llmrun.model.fastpath.cpu import CpuDecoder
from llmrun.model.fastpath.static import StaticDecoder
from llmrun.model.fastpath.step import FastDecoder
from llmrun.model.kvcache import KVCache
from llmrun.model.transformer import Transformer

__all__ = ["CpuDecoder", "FastDecoder", "StaticDecoder", "fast_decoder", "fast_enabled", "prepare_decode", "supported"]


def fast_enabled() -> bool:
    """Whether ``decode_step`` takes the fast path by default: unless ``LLMRUN_FAST=0``."""
    return os.environ.get("LLMRUN_FAST", "1") != "0"


def supported(model: Transformer, cache: KVCache) -> bool:
    """Whether the fast decoders compute what the eager path does for this model and cache.

    Dynamic NTK RoPE changes every angle once the sequence passes ``max_position_embeddings``;
    the fast path precomputes angles per position, so it declines when the cache could get there.
    A left-padded cache (``cache.padding``) holds rows at different positions, each with its own
    mask; the fast decoders take one position for the whole batch and attend to every key.
    """
    args = model.args
    if cache.padding is not None:
        return False
    return not (args.rope_type == "dynamic" and cache.max_seq_len > args.max_position_embeddings)


def fast_decoder(model: Transformer, cache: KVCache) -> FastDecoder | None:
    """The fast decoder bound to ``cache`` (built on first use), or None where the fast path does not apply.

    A ``StaticDecoder`` for a cache on a CUDA device, else a ``CpuDecoder``; it lives on
    ``cache.decoder``, as long as the cache (and is not used while the cache is padded).
    """
    if not supported(model, cache):
        return None
    decoder = _built(model, cache)
    if decoder is None:
        kind = StaticDecoder if cache.layers[0].k.device.type == "cuda" else CpuDecoder
        decoder = cache.decoder = kind(model, cache)
    return decoder


def prepare_decode(model: Transformer, cache: KVCache) -> float:
    """Build the fast decoder for ``cache`` now (compiling it and capturing its CUDA graph on a GPU).

    Returns the seconds spent: 0 if it was built before, the fast path is off or does not apply.
    Callers time this apart from the first token, so compile/capture time is reported, never hidden.
    """
    if not fast_enabled() or _built(model, cache) is not None:
        return 0.0
    t0 = time.perf_counter()
    decoder = fast_decoder(model, cache)
    return time.perf_counter() - t0 if decoder is not None else 0.0


def _built(model: Transformer, cache: KVCache) -> FastDecoder | None:
    """The decoder already on ``cache`` if it was built for ``model``."""
    decoder = cache.decoder
    return decoder if decoder is not None and decoder.model is model else None
