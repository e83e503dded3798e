"""Token embedding and LM head; the head may share (tie) the embedding matrix."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quadrant.quant.formats import Kernels, Plan, pack_plan, run_kernels


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, scale: float | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
        self.scale = scale
        self.out_dtype: torch.dtype | None = None  # set when the table is stored narrower than activations

    def compact(self, dtype: torch.dtype) -> None:
        """Store the table in `dtype` (bf16 halves it); rows are widened back on lookup."""
        self.out_dtype = self.weight.dtype
        self.weight = nn.Parameter(self.weight.data.to(dtype), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = F.embedding(input_ids, self.weight)  # [T, D]
        if self.out_dtype is not None:
            h = h.to(self.out_dtype)
        if self.scale is not None:
            # Gemma multiplies by sqrt(D) rounded to the activation dtype.
            h = h * torch.tensor(self.scale, dtype=h.dtype)
        return h


class LMHead(nn.Module):
    """Logits over the vocabulary; with `tied`, reads the embedding's matrix."""

    def __init__(self, vocab_size: int, hidden_size: int, tied: VocabEmbedding | None = None,
                 softcap: float | None = None) -> None:
        super().__init__()
        # A plain list keeps the embedding out of this module's children, so its
        # matrix is listed (and loaded) once, under the embedding's name.
        self._tied = [tied] if tied is not None else []
        self.weight = None if tied is not None else nn.Parameter(torch.empty(vocab_size, hidden_size))
        self.softcap = softcap
        self.kernels: Kernels = []

    def repack(self, plan: Plan) -> None:
        """Keep the (possibly tied) matrix in the plan's formats for the logits matmul."""
        weight = self._tied[0].weight if self._tied else self.weight
        assert weight is not None
        self.kernels = pack_plan(plan, weight.data, None)
        if not self._tied:
            del self.weight
            self.weight = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.kernels:
            logits = run_kernels(self.kernels, hidden)
        else:
            weight = self._tied[0].weight if self._tied else self.weight
            assert weight is not None
            logits = F.linear(hidden, weight)  # [N, V]
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
