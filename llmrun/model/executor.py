"""The layer-by-layer executor: one explicit loop over the blocks, with probe hook points.

``prefill`` runs every prompt token through each layer in one pass and fills the KV cache;
``decode_step`` runs one new token per sequence. Both return float32 logits; neither samples
nor prints. A ``Probe`` (``llmrun.model.probe``) sees every named op; the default one records nothing.

Decode has a fast path (``llmrun.model.fastpath``: preallocated buffers, fused kernels, CUDA graphs
on a GPU) that computes the same logits. ``decode_step`` takes it whenever no probe is given; a
probe always gets the eager ops it can time. ``LLMRUN_FAST=0`` turns it off; ``prepare_decode``
builds it ahead of the first step.
"""

from __future__ import annotations

import torch

from llmrun.devices import check_fits
from llmrun.model.fastpath import fast_decoder, fast_enabled, prepare_decode
from llmrun.model.kvcache import KVCache
from llmrun.model.memory import activation_bytes
from llmrun.model.probe import NULL_PROBE, Probe
from llmrun.model.transformer import Transformer

__all__ = ["decode_step", "forward", "make_cache", "prefill", "prepare_decode"]

CHECKED_ACTIVATIONS = 256 * 2**20  # bytes of intermediates from which a forward pass checks the memory free


@torch.inference_mode()
def forward(
    model: Transformer,
    tokens: torch.Tensor,
    cache: KVCache | None = None,
    probe: Probe = NULL_PROBE,
    *,
    last_only: bool = False,
    padding: torch.Tensor | None = None,
) -> torch.Tensor:
    """tokens (B, T) int64 -> logits (B, T, V) float32.

    With a cache the tokens take the next T positions (from ``cache.length``, which then grows by T)
    and attend to everything before them; without one they are positions 0..T-1 and attend only to
    each other. With ``last_only`` the lm_head runs on the last position alone: (B, 1, V).

    ``padding`` (B,) int64 says how many of each row's first tokens are left padding (any ids): no
    query attends to them and the row's positions count from its first real token, so a padded
    row's logits are those of the row alone. Given with a cache it is kept as ``cache.padding`` for
    the later passes, and must come with the first tokens of an empty cache.
    """
    start = cache.reserve(tokens.shape[1]) if cache is not None else 0
    _check_activations(model, tokens.shape, start, all_logits=not last_only)
    if padding is not None:
        if padding.shape != tokens.shape[:1]:
            raise ValueError(f"padding must be ({tokens.shape[0]},), got shape {tuple(padding.shape)}")
        padding = padding.to(tokens.device, torch.int64) if bool(padding.any()) else None
        if cache is not None:
            if start:
                raise ValueError("padding comes with the first tokens of an empty cache")
            cache.padding = padding
    if cache is not None:
        padding = cache.padding
    decoder = model.model
    with probe.region("embed"):
        x = decoder.embed_tokens(tokens)  # (B, T, d)
    rope = model.rotary.angles(start, tokens.shape[1], x.device, x.dtype, padding)
    for i, block in enumerate(decoder.layers):
        x = block(x, rope, start, cache.layers[i] if cache is not None else None, probe, padding)
    if cache is not None:
        cache.length = start + tokens.shape[1]
    if last_only:
        x = x[:, -1:]
    with probe.region("final_norm"):
        x = decoder.norm(x)
    with probe.region("lm_head"):
        return model.lm_head(x).float()


def _check_activations(model: Transformer, shape: torch.Size, start: int, *, all_logits: bool) -> None:
    """Refuse a forward pass whose intermediates cannot fit in the memory free (only large ones are checked)."""
    batch, tokens = shape
    weight = model.lm_head.weight
    nbytes = activation_bytes(model.args, batch, tokens, start + tokens, weight.dtype, all_logits=all_logits)
    if nbytes >= CHECKED_ACTIVATIONS:
        check_fits(nbytes, weight.device, f"a forward pass of {batch} x {tokens} tokens")


def prefill(
    model: Transformer,
    tokens: torch.Tensor,
    cache: KVCache,
    probe: Probe = NULL_PROBE,
    *,
    padding: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run prompt tokens (B, T) through all layers after the cache's filled positions; logits of the last (B, V).

    ``padding`` (B,) int64: each row's count of left-padded tokens, into an empty cache (see ``forward``).
    """
    return forward(model, tokens, cache, probe, last_only=True, padding=padding)[:, -1]


def decode_step(
    model: Transformer,
    token: torch.Tensor,
    cache: KVCache,
    probe: Probe = NULL_PROBE,
    *,
    fast: bool | None = None,
    copy: bool = True,
) -> torch.Tensor:
    """One new token per sequence, token (B,) or (B, 1), at position ``cache.length``; logits (B, V) float32.

    ``fast`` None takes the fast path when no probe is given (and ``LLMRUN_FAST`` is not 0); True
    asks for it, False forces the eager ops. With ``copy=False`` the fast path returns its own
    logits buffer, valid until the next step on this cache, so that a step allocates nothing.
    A padded cache (``cache.padding``) always runs the eager ops (``fastpath.supported``).
    """
    if probe is NULL_PROBE and fast is not False and (fast or fast_enabled()):
        decoder = fast_decoder(model, cache)
        if decoder is not None:
            logits = decoder.step(token)
            return logits.clone() if copy else logits
    return forward(model, token.view(-1, 1), cache, probe)[:, -1]


def make_cache(model: Transformer, batch: int, max_seq_len: int) -> KVCache:
    """A KV cache for ``batch`` sequences of up to ``max_seq_len`` tokens, in the model's dtype/device.

    On a tensor-parallel shard it holds this rank's key/value heads (``model.local_args``).
    """
    args = model.local_args
    weight = model.model.embed_tokens.weight
    return KVCache(
        args.num_hidden_layers,
        batch,
        args.num_key_value_heads,
        max_seq_len,
        args.head_dim,
        dtype=weight.dtype,
        device=weight.device,
    )
