"""Token embedding and LM head; the head may share (tie) the embedding matrix.

Vocab-parallel (parallel/tensor_parallel.py): each rank holds a contiguous slice of the
vocabulary's rows (the last one zero-padded); the embedding sums the ranks' lookups, the LM
head gathers their logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class VocabShard:
    start: int  # first vocabulary row this rank holds
    vocab_size: int  # the whole vocabulary (the gathered logits are cut back to it)
    group: dist.ProcessGroup

from quadrant.quant.formats import Kernels, Plan, pack_plan, run_kernels


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, scale: float | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
        self.scale = scale
        self.out_dtype: torch.dtype | None = None  # set when the table is stored narrower than activations
        self.shard: VocabShard | None = None

    def compact(self, dtype: torch.dtype) -> None:
        """Store the table in `dtype` (bf16 halves it); rows are widened back on lookup."""
        self.out_dtype = self.weight.dtype
        self.weight = nn.Parameter(self.weight.data.to(dtype), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.shard is None:
            h = F.embedding(input_ids, self.weight)  # [T, D]
        else:
            local = input_ids - self.shard.start
            outside = (local < 0) | (local >= self.weight.shape[0])
            h = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[:, None], 0)
        if self.out_dtype is not None:
            h = h.to(self.out_dtype)
        if self.scale is not None:
            # Gemma multiplies by sqrt(D) rounded to the activation dtype.
            h = h * torch.tensor(self.scale, dtype=h.dtype)
        if self.shard is not None:
            dist.all_reduce(h, group=self.shard.group)  # each token's row came from one rank, zeros elsewhere
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
        self.hidden_size = hidden_size
        self.kernels: Kernels = []
        self.shard: VocabShard | None = None

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
        if self.shard is not None:
            parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(self.shard.group))]
            dist.all_gather(parts, logits.contiguous(), group=self.shard.group)
            logits = torch.cat(parts, dim=-1)[:, : self.shard.vocab_size]
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
