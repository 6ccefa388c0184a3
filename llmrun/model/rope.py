"""Rotary position embeddings (RoPE), with the rope_scaling variants of Llama 3, linear and dynamic NTK.

Follows transformers' ``modeling_rope_utils`` and Meta's llama3 ``apply_scaling``: inverse
frequencies in float32 on the CPU, rotate-half layout (HF's, not llama.cpp's interleaved pairs).
"""

from __future__ import annotations

import math

import torch

from llmrun.errors import LlmrunError
from llmrun.model.config import ROPE_TYPES, ModelArgs


def rope_inv_freq(args: ModelArgs, seq_len: int | None = None) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) float32, with ``rope_scaling`` applied (llama3, linear, dynamic).

    Dynamic NTK scaling depends on ``seq_len``, the length of the sequence so far (positions
    0..seq_len-1): past ``max_position_embeddings`` the base grows as in transformers'
    ``_compute_dynamic_ntk_parameters``; up to it (or with ``seq_len`` None) it is plain RoPE.
    """
    dim = args.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim
    scaling = args.rope_scaling or {}
    kind = args.rope_type
    base = args.rope_theta
    if kind == "dynamic" and seq_len is not None and seq_len > args.max_position_embeddings:
        factor = float(scaling["factor"])
        base = base * (factor * seq_len / args.max_position_embeddings - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base**exponents)
    if kind in ("default", "dynamic"):
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        return llama3_inv_freq(inv_freq, scaling)
    raise LlmrunError(f"config.json: rope_scaling type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1's frequency-dependent RoPE scaling (Meta's ``apply_scaling``)."""
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(is_medium, smoothed, scaled)


class Rotary:
    """Rotate-half RoPE. ``inv_freq`` stays float32 on the CPU whatever the model's dtype."""

    def __init__(self, args: ModelArgs) -> None:
        self.args = args
        self.inv_freq = rope_inv_freq(args)
        self._on_device: dict[torch.device, torch.Tensor] = {}

    def angles(
        self,
        start: int,
        t: int,
        device: torch.device,
        dtype: torch.dtype,
        padding: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (T, head_dim) for positions start..start+T-1, in ``dtype``.

        With ``padding`` (B,) int64, row b's first ``padding[b]`` positions are left padding and its
        positions count from its first real token, as transformers' position ids under an attention
        mask: cos and sin are (B, 1, T, head_dim), position max(0, start + i - padding[b]).
        With dynamic RoPE past ``max_position_embeddings`` the frequencies follow the sequence length
        (the longest row's), as transformers recomputes them each forward (keys already cached keep their angles).
        """
        dynamic = self.args.rope_type == "dynamic"
        longest = start + t - (int(padding.min()) if dynamic and padding is not None else 0)
        if dynamic and longest > self.args.max_position_embeddings:
            inv_freq = rope_inv_freq(self.args, longest).to(device)
        else:
            inv_freq = self._on_device.get(device)
            if inv_freq is None:
                inv_freq = self._on_device.setdefault(device, self.inv_freq.to(device))
        positions = torch.arange(start, start + t, device=device, dtype=torch.float32)
        if padding is not None:  # (B, 1, T): one row of positions per sequence, broadcast over the heads
            positions = (positions[None, :] - padding.to(device, torch.float32)[:, None]).clamp_(min=0)[:, None]
        freqs = positions[..., None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, H, T, D) and k (B, Hkv, T, D) by angles cos/sin (T, D) or, per row, (B, 1, T, D)."""
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
