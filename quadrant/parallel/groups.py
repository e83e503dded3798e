"""Process groups of one engine's workers: who is which tensor- and expert-parallel rank.

The tp x ep workers form a grid, rank = ep_rank * tp + tp_rank: the ranks of one ep_rank split
attention and dense MLPs (a tensor-parallel group), the ranks of one tp_rank split the experts
(an expert-parallel group). Nothing here is global: a ParallelState is passed to whatever shards
or communicates (parallel/tensor_parallel.py, parallel/expert_parallel.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from quadrant.config import ParallelConfig


@dataclass
class ParallelState:
    rank: int = 0
    world_size: int = 1
    tp_rank: int = 0
    tp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    tp_group: dist.ProcessGroup | None = None  # None where the size is 1
    ep_group: dist.ProcessGroup | None = None
    world_group: dist.ProcessGroup | None = None
    control_group: dist.ProcessGroup | None = None  # gloo (host objects: the step messages), also under NCCL
    num_redundant_experts: int = 0  # extra expert slots over the expert-parallel group (parallel/eplb.py)

    @property
    def is_driver_worker(self) -> bool:
        """Rank 0 samples and talks to the driver."""
        return self.rank == 0

    @classmethod
    def initialize(cls, config: ParallelConfig, rank: int, device_type: str, init_method: str,
                   timeout_s: float = 600.0) -> "ParallelState":
        """Join the process group (NCCL on CUDA, gloo elsewhere) and build the TP and EP subgroups.
        Every rank creates every subgroup, in the same order, as torch.distributed requires."""
        backend = "nccl" if device_type == "cuda" else "gloo"
        timeout = timedelta(seconds=timeout_s)
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=config.world_size,
                                timeout=timeout)
        tp, ep = config.tensor_parallel_size, config.expert_parallel_size
        state = cls(rank, config.world_size, rank % tp, tp, rank // tp, ep,
                    num_redundant_experts=config.num_redundant_experts)
        state.world_group = dist.group.WORLD if config.world_size > 1 else None
        for e in range(ep):
            group = dist.new_group([e * tp + t for t in range(tp)])
            if e == state.ep_rank and tp > 1:
                state.tp_group = group
        for t in range(tp):
            group = dist.new_group([e * tp + t for e in range(ep)])
            if t == state.tp_rank and ep > 1:
                state.ep_group = group
        state.control_group = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else dist.group.WORLD
        return state
