"""A static key/value cache that knows how far it is filled.

Each layer holds k and v buffers of shape (B, H_kv, S_max, D), preallocated once and written in
place; nothing is reallocated while generating. ``length`` is the number of positions filled
(the same for every sequence of the batch): the executor writes new tokens at ``length`` and
advances it, so callers never pass positions. ``trim`` forgets the positions past a prefix (a
chat turn that shares the start of the conversation), ``reset`` empties the cache.

Prompts of different lengths share one cache by left padding: ``padding`` (B,) int64 holds each
row's count of padded positions at the start (None: no row is padded). Attention never looks at a
row's padded keys, and a row's RoPE positions count from its first real token.
"""

from __future__ import annotations

import math

import torch

from llmrun.devices import check_fits


class LayerCache:
    """K and V buffers (B, H_kv, S_max, D) of one layer."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H_kv, T, D) at positions start..start+T-1; return views of 0..start+T-1."""
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """One ``LayerCache`` per layer, all of capacity ``max_seq_len`` positions, filled to ``length``."""

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (batch, n_kv_heads, max_seq_len, head_dim)
        nbytes = 2 * n_layers * math.prod(shape) * dtype.itemsize
        check_fits(nbytes, torch.device(device), f"a KV cache of {batch} x {max_seq_len} positions")
        self.max_seq_len = max_seq_len
        self.length = 0
        self.padding: torch.Tensor | None = None  # (B,) int64 left-padded positions per row; None: none
        # the fast decoder on these buffers (llmrun.model.fastpath.fast_decoder), built on first use
        self.decoder = None
        self.layers = [
            LayerCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(n_layers)
        ]

    @property
    def batch(self) -> int:
        """Sequences the cache holds."""
        return self.layers[0].k.shape[0]

    @property
    def free(self) -> int:
        """Positions still empty."""
        return self.max_seq_len - self.length

    def reserve(self, tokens: int) -> int:
        """The position where ``tokens`` new positions start; ValueError if they do not fit."""
        if tokens > self.free:
            raise ValueError(f"{tokens} new positions do not fit: the cache holds {self.length} of {self.max_seq_len}")
        return self.length

    def trim(self, length: int) -> None:
        """Keep the first ``length`` positions (at most those filled) and forget the rest (the padding too at 0)."""
        self.length = max(0, min(self.length, length))
        if self.length == 0:
            self.padding = None

    def grow(self, max_seq_len: int) -> None:
        """Hold ``max_seq_len`` positions from now on (never fewer than now), keeping the filled ones.

        The buffers are reallocated, so a fast decoder built on the old ones is dropped.
        """
        if max_seq_len <= self.max_seq_len:
            return
        for layer in self.layers:
            for name in ("k", "v"):
                old = getattr(layer, name)
                new = old.new_zeros(*old.shape[:2], max_seq_len, old.shape[3])
                new[:, :, : self.length] = old[:, :, : self.length]
                setattr(layer, name, new)
        self.max_seq_len = max_seq_len
        self.decoder = None

    def reset(self) -> None:
        """Forget every position and the padding (the buffers are overwritten by the next tokens)."""
        self.length = 0
        self.padding = None

    @property
    def nbytes(self) -> int:
        """Bytes held by all buffers."""
        return sum(c.k.nbytes + c.v.nbytes for c in self.layers)
