"""RMSNorm, optionally fused with the residual add that precedes it.

Computed in fp32 whatever the activation dtype, as Hugging Face does, so bf16
models match their reference. `offset` 1.0 gives Gemma's (1 + w) gain.
"""

from __future__ import annotations

import torch
from torch import nn

from quadrant.kernels.fused_norm_rope import rms_norm, rms_norm_ref, use_fused


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
        # The torch math lives with the kernel, as its reference: kernels import no layers.
        return rms_norm_ref(x, self.weight, self.eps, residual, self.offset)
