"""A static key/value cache: per-layer buffers preallocated once, written in place.

Shapes: each layer holds k and v of shape (B, H_kv, S_max, D). Nothing is reallocated while
generating: ``update`` copies the new positions into the buffers and returns views of the
filled prefix.
"""

from __future__ import annotations

import torch


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
    """One ``LayerCache`` per layer, all of capacity ``max_seq_len`` positions."""

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
        self.max_seq_len = max_seq_len
        self.decoder = None  # the llmrun.model.fastpath.StaticDecoder bound to these buffers, built on first use
        self.layers = [
            LayerCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(n_layers)
        ]

    @property
    def nbytes(self) -> int:
        """Bytes held by all buffers."""
        return sum(c.k.nbytes + c.v.nbytes for c in self.layers)
