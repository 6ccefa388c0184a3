"""The decode step that ``llmrun bench`` times and ``llmrun profile`` profiles: one code path for both.

``decode_token`` is the step of generation: the fast decoder (``llmrun.model.fastpath``) where it
applies, else the eager ops. With a probe, the fast decoder marks its op groups on it
(``FastDecoder.step(token, probe)``); the eager ops enter a region per named op. ``decode_path`` names
the path a cache's steps take, as the profile reports it; ``profiled_step`` the probed step the
profile times (on a CUDA graph, a graph with timing events inside).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from llmrun.model.executor import decode_step
from llmrun.model.fastpath import fast_decoder
from llmrun.model.kvcache import KVCache
from llmrun.model.probe import NULL_PROBE, Probe
from llmrun.model.transformer import Transformer
from llmrun.profiler.graphtimer import ProfiledStaticDecoder, graphed
from llmrun.profiler.timers import OpTimer


def decode_token(
    model: Transformer, token: torch.Tensor, cache: KVCache, probe: Probe = NULL_PROBE, *, fast: bool = True
) -> torch.Tensor:
    """One decode step of token ids (B,) at ``cache.length`` -> logits (B, V) float32, valid until the next step.

    ``fast`` takes the fast path where it applies (as generation does); False runs the eager ops.
    """
    if probe is NULL_PROBE or not fast:
        return decode_step(model, token, cache, probe, fast=fast, copy=False)
    decoder = fast_decoder(model, cache)
    if decoder is None:
        return decode_step(model, token, cache, probe, fast=False, copy=False)
    return decoder.step(token, probe)


def profiled_step(
    model: Transformer, cache: KVCache, timer: OpTimer, *, fast: bool = True
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The probed decode step on ``cache``: token ids (B,) -> logits (B, V), its op times going to ``timer``.

    Where decode runs as a CUDA graph, a graph of the same step with timing events captured inside
    it (``llmrun.profiler.graphtimer``, built here, beside the decoder generation uses); elsewhere
    ``decode_token`` with ``timer`` as the probe.
    """
    if fast and graphed(model, cache):
        decoder = ProfiledStaticDecoder(model, cache)
        decoder.timer = timer
        return decoder.step
    return functools.partial(_probed, model, cache=cache, probe=timer, fast=fast)


def _probed(model: Transformer, token: torch.Tensor, *, cache: KVCache, probe: Probe, fast: bool) -> torch.Tensor:
    return decode_token(model, token, cache, probe, fast=fast)


def decode_path(model: Transformer, cache: KVCache, *, fast: bool = True) -> str:
    """``fast`` when ``decode_token(..., fast=fast)`` runs the fast decoder for ``cache``, else ``eager``."""
    return "fast" if fast and fast_decoder(model, cache) is not None else "eager"
