"""Rotary position embedding (neox / Hugging Face rotate-half layout) and its scalings.

The cos/sin table is computed once up to max_positions and indexed by each
token's absolute position, so prefill chunks and decode tokens mix freely.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from quadrant.kernels.fused_norm_rope import apply_rotary_inplace, apply_rotary_ref, use_fused


def rope_inv_freq(
    head_dim: int, theta: float, scaling: dict[str, Any] | None, freq_factors: list[float] | None = None
) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if freq_factors is not None:
        # GGUF files of Llama 3.1 carry the llama3 scaling precomputed as per-frequency divisors.
        inv_freq = inv_freq / torch.tensor(freq_factors, dtype=torch.float32)
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "linear":
        inv_freq = inv_freq / float(scaling["factor"])  # type: ignore[index]
    elif rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)  # type: ignore[arg-type]
    return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between.
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_ctx = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    cos_cached: torch.Tensor
    sin_cached: torch.Tensor

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float,
        scaling: dict[str, Any] | None = None,
        freq_factors: list[float] | None = None,
    ) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling, freq_factors)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        # [max_positions, head_dim]: cos repeated over both halves, sin signed (-sin | +sin) so that
        # rotation is x * cos + swap_halves(x) * sin, three ops for all of q and k together.
        self.register_buffer("cos_cached", torch.cat([freqs.cos(), freqs.cos()], -1), persistent=False)
        self.register_buffer("sin_cached", torch.cat([-freqs.sin(), freqs.sin()], -1), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] -> (cos, signed sin), each [T, 1, D] in `dtype`, broadcasting over heads."""
        cos = self.cos_cached[positions].unsqueeze(1)
        sin = self.sin_cached[positions].unsqueeze(1)
        return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x: [T, H, D] (rotate-half layout) by its tokens' tables from RotaryEmbedding.cos_sin."""
    # The torch math lives with the kernel, as its reference: kernels import no layers.
    return apply_rotary_ref(x, cos, sin)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary, in place in one kernel on the GPU (x is then overwritten)."""
    if use_fused(x):
        return apply_rotary_inplace(x, cos, sin)
    return apply_rotary(x, cos, sin)
