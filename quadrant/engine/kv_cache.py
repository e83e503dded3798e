"""The paged KV cache: a pool of fixed-size blocks and the per-layer K/V tensors.

Each sequence owns a block table (list of block ids); the runner turns token
positions into cache slots through it. Blocks are recycled through a free list.
"""

from __future__ import annotations

from collections import deque

import torch

from quadrant.config import CacheConfig, ModelConfig


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"KV cache exhausted: need {n} blocks, {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)


def allocate_kv_tensors(
    model: ModelConfig, cache: CacheConfig, num_blocks: int, dtype: torch.dtype, device: torch.device | str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (K, V) pair per layer, each [num_blocks, block_size, kv_heads, head_dim]."""
    shape = (num_blocks, cache.block_size, model.num_key_value_heads, model.head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(model.num_hidden_layers)
    ]
