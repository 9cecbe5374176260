"""Rotary position embedding: the cos/sin cache (default and llama3 rope types) its op reads."""

from __future__ import annotations

import math

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "llama3")


def inv_frequencies(rope: dict, rot_dim: int) -> torch.Tensor:
    """[rot_dim / 2] float32 angular frequencies, computed as transformers does."""
    rope_type = rope.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    base = float(rope.get("rope_theta", 10000.0))
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim))
    if rope_type == "llama3":
        inv_freq = _llama3_scaled(inv_freq, rope)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, rope: dict) -> torch.Tensor:
    """Llama 3.1's scaling: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between."""
    factor = rope["factor"]
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    old_context = rope["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    ramp = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(medium, ramp, scaled)


class RotaryEmbedding(nn.Module):
    """The cos/sin cache of the neox-style rotation (ops.rotary_embedding), shared by every layer."""

    def __init__(self, head_dim: int, max_position: int, rope: dict, dtype: torch.dtype):
        super().__init__()
        inv_freq = inv_frequencies(rope, head_dim)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        # Rounded to the model dtype, as transformers does before applying it.
        cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype)  # [max_position, head_dim]
        self.register_buffer("cos_sin_cache", cache, persistent=False)
