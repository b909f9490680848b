"""Rotary-embedding cos/sin tables for Llama-family models (pure PyTorch, no Triton).

Supports rope scaling types: none / "default", "linear", and "llama3" (Llama 3.1), with the
same inverse frequencies as Hugging Face transformers.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["build_rope_cache", "rope_inv_freq"]


def rope_inv_freq(head_dim: int, base: float, scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """float32 (head_dim // 2,) inverse frequencies, after `scaling` (a config's rope_scaling)."""
    assert head_dim % 2 == 0, f"head_dim must be even, got {head_dim}"
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_freq_wavelen, high_freq_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")


def build_rope_cache(head_dim: int, max_positions: int, base: float = 10000.0,
                     scaling: dict[str, Any] | None = None,
                     device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each float32 (max_positions, head_dim // 2): angle[p, i] = p * inv_freq[i]."""
    inv_freq = rope_inv_freq(head_dim, base, scaling)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    return angles.cos().to(device), angles.sin().to(device)
