"""RMSNorm, optionally fused with the residual add that precedes it.

Computed in fp32 whatever the activation dtype, as Hugging Face does, so bf16
models match their reference. `offset` 1.0 gives Gemma's (1 + w) gain.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quadrant.kernels.fused_norm_rope import rms_norm, use_fused


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, offset: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.full((hidden_size,), 1.0 - offset))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Normalise x; with `residual`, normalise x + residual and also return that sum."""
        if use_fused(x) and self.weight.dtype == x.dtype:
            return rms_norm(x, self.weight, self.eps, residual, self.offset)  # one kernel on the GPU
        if residual is not None:
            x = x + residual
            residual = x
        if not self.offset and x.dtype == torch.float32:
            out = F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one fused op
            return out if residual is None else (out, residual)
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            out = (h * (self.offset + self.weight.float())).to(dtype)
        else:
            out = self.weight * h.to(dtype)
        return out if residual is None else (out, residual)
