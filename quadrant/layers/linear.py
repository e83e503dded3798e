"""Linear layers and the weight loaders that fill packed (merged) projections.

QKV and gate/up are packed into one matrix so each layer runs fewer, larger
matmuls; checkpoints store them separately, so each packed layer knows the
slice every source tensor goes to (`weight_loader(param, tensor, shard)`).
Under tensor parallelism (parallel/tensor_parallel.py) a layer holds its rank's
rows (column-parallel) or columns (row-parallel, whose partial outputs are
summed over `tp_group`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from quadrant.quant.formats import Kernels, Plan, pack_plan, run_kernels, share_token_scales


class Linear(nn.Module):
    """y = x W^T (+ b). W: [out_features, in_features], loaded dense, then optionally repacked."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.kernels: Kernels = []  # empty: the dense parameters, as loaded
        self.tp_group: dist.ProcessGroup | None = None  # row-parallel: all-reduce the partial outputs here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias) if not self.kernels else run_kernels(self.kernels, x)
        if self.tp_group is not None:
            dist.all_reduce(y, group=self.tp_group)
        return y

    def repack(self, plan: Plan) -> None:
        """Convert the loaded weight to the plan's formats; the dense parameter is dropped."""
        self.kernels = pack_plan(plan, self.weight.data, None if self.bias is None else self.bias.data)
        if self.tp_group is not None:
            share_token_scales(self.kernels, self.tp_group)
        del self.weight
        self.weight = None  # type: ignore[assignment]
        if self.bias is not None:
            del self.bias
            self.bias = None


class MergedLinear(Linear):
    """Several projections of the same input stacked on the output dim (gate_up, qkv).

    `shard_sizes[name]` gives each part's rows in order; loading a checkpoint
    tensor for part `name` copies it into that slice.
    """

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = False) -> None:
        super().__init__(in_features, sum(shard_sizes.values()), bias)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, size in shard_sizes.items():
            self.shard_offsets[name] = (start, size)
            start += size
        self.weight.weight_loader = self._load_shard  # type: ignore[attr-defined]
        if self.bias is not None:
            self.bias.weight_loader = self._load_shard  # type: ignore[attr-defined]

    def _load_shard(self, param: torch.Tensor, loaded: torch.Tensor, shard: str | None) -> None:
        start, size = (0, param.shape[0]) if shard is None else self.shard_offsets[shard]
        target = param.data.narrow(0, start, size)
        if target.shape != loaded.shape:
            raise ValueError(f"shard {shard}: expected shape {tuple(target.shape)}, got {tuple(loaded.shape)}")
        target.copy_(loaded)

    def read_shard(self, param: torch.Tensor, shard: str) -> torch.Tensor:
        """The inverse of the weight loader: part `shard` of the packed tensor (for export)."""
        start, size = self.shard_offsets[shard]
        return param.narrow(0, start, size)

    def split(self, y: torch.Tensor) -> list[torch.Tensor]:
        return list(y.split([size for _, size in self.shard_offsets.values()], dim=-1))
