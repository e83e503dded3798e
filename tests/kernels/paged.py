"""Random paged-cache layouts for the attention and KV-store kernel tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quadrant.kernels.kv_store import store_kv_ref


@dataclass
class PagedCase:
    k_cache: torch.Tensor  # [num_blocks, Hk, block_size, D]
    v_cache: torch.Tensor
    k_scale: torch.Tensor | None  # [num_blocks, Hk, block_size // group] for 8-bit caches
    v_scale: torch.Tensor | None
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32
    group: int

    def to(self, device: torch.device | str) -> PagedCase:
        return PagedCase(*(t.to(device) if isinstance(t, torch.Tensor) else t for t in self.__dict__.values()))


def slots_for(block_tables: torch.Tensor, b: int, start: int, end: int, block_size: int) -> torch.Tensor:
    pos = torch.arange(start, end)
    return block_tables[b, pos // block_size].long() * block_size + pos % block_size


def make_paged_case(seq_lens: list[int], num_kv: int, dim: int, block_size: int, dtype: torch.dtype,
                    cache_dtype: torch.dtype | None = None, group: int = 0, seed: int = 0) -> PagedCase:
    """Blocks handed out in a shuffled order; every sequence's context filled with random K/V
    through the reference store, a few tokens at a time as chunked prefill and decode would.
    Built on the CPU (seeded generator), returned on the default device."""
    device = torch.get_default_device()
    with torch.device("cpu"):
        case = _make_case(seq_lens, num_kv, dim, block_size, dtype, cache_dtype, group, seed)
    return case.to(device)


def _make_case(seq_lens: list[int], num_kv: int, dim: int, block_size: int, dtype: torch.dtype,
               cache_dtype: torch.dtype | None, group: int, seed: int) -> PagedCase:
    gen = torch.Generator().manual_seed(seed)
    cache_dtype = cache_dtype or dtype
    widths = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(widths) + 3
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(seq_lens), max(widths), dtype=torch.int32)
    used = 0
    for b, w in enumerate(widths):
        tables[b, :w] = order[used:used + w].int()
        used += w
    shape = (num_blocks, num_kv, block_size, dim)
    k_cache = torch.zeros(shape, dtype=cache_dtype)
    v_cache = torch.zeros(shape, dtype=cache_dtype)
    quantised = cache_dtype in (torch.int8, torch.float8_e4m3fn)
    k_scale = torch.zeros(num_blocks, num_kv, block_size // group) if quantised else None
    v_scale = torch.zeros(num_blocks, num_kv, block_size // group) if quantised else None
    for b, n in enumerate(seq_lens):
        pos = 0
        while pos < n:
            step = min(n - pos, int(torch.randint(1, 9, (1,), generator=gen)))
            k = torch.randn(step, num_kv, dim, generator=gen).to(dtype)
            v = torch.randn(step, num_kv, dim, generator=gen).to(dtype)
            store_kv_ref(k, v, k_cache, v_cache, slots_for(tables, b, pos, pos + step, block_size),
                         k_scale, v_scale, group)
            pos += step
    return PagedCase(k_cache, v_cache, k_scale, v_scale, tables, torch.tensor(seq_lens, dtype=torch.int32), group)
