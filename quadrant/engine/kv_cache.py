"""The paged KV cache: a pool of fixed-size blocks, prefix caching and the per-layer K/V tensors.

Each request owns a block table. A full block is named by a hash chained over
every token before it, so two requests with the same prefix map it to the same
block: it is reused with a reference count, and kept after its last user
leaves, until the pool needs it back (least recently freed first).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable

import torch

from quadrant.config import CacheConfig, ModelConfig
from quadrant.engine.request import Request
from quadrant.quant.formats import native_kernels_available
from quadrant.layers.attention import LayerKVCache


def hash_block(parent: int | None, tokens: Iterable[int]) -> int:
    """Chained block hash: equal only if this block and every block before it hold the same tokens.

    A cryptographic digest, not Python's hash(): token sequences are user input, and a crafted
    collision would hand one user's cached KV to another.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update((parent or 0).to_bytes(16, "little"))
    h.update(array("q", tokens).tobytes())
    return int.from_bytes(h.digest(), "little")


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        # Blocks with no users, oldest-freed first; cached ones among them can still be revived.
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_queue):
            raise MemoryError(f"KV cache exhausted: need {n} blocks, {len(self.free_queue)} free")
        blocks = []
        for _ in range(n):
            block, _ = self.free_queue.popitem(last=False)
            self._evict(block)
            self.ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def touch(self, blocks: list[int]) -> None:
        """Take a reference on prefix-cache hits, reviving them from the free queue."""
        for b in blocks:
            if self.ref_counts[b] == 0:
                del self.free_queue[b]
            self.ref_counts[b] += 1

    def free(self, blocks: Iterable[int]) -> None:
        for b in blocks:
            self.ref_counts[b] -= 1
            assert self.ref_counts[b] >= 0, f"block {b} freed twice"
            if self.ref_counts[b] == 0:
                self.free_queue[b] = None

    def register(self, block: int, block_hash: int) -> None:
        if block_hash not in self.cached and self.block_hash[block] is None:
            self.block_hash[block] = block_hash
            self.cached[block_hash] = block

    def forget_hashes(self) -> None:
        """No block is named by a hash any more (each keeps its K/V and users; nothing is a prefix hit)."""
        self.block_hash = [None] * self.num_blocks
        self.cached.clear()

    def _evict(self, block: int) -> None:
        h = self.block_hash[block]
        if h is not None:
            self.block_hash[block] = None
            if self.cached.get(h) == block:
                del self.cached[h]


class KVCacheManager:
    """Block accounting for the scheduler: allocation, prefix hits, release. Pure Python, no tensors."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.num_queries = 0  # prompt tokens looked up in the prefix cache
        self.num_hits = 0  # of those, tokens found

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    @property
    def hit_rate(self) -> float:
        return self.num_hits / self.num_queries if self.num_queries else 0.0

    def find_cached_prefix(self, req: Request) -> list[int]:
        """Blocks holding the longest cached prefix of the request's tokens (always leaving one token to run)."""
        if not self.enable_prefix_caching or req.params.prompt_logprobs is not None or req.params.pooling:
            return []  # a scored or embedded prompt runs whole: it reads every token's logits or hidden state
        tokens = req.all_token_ids
        bs = self.block_size
        hits: list[int] = []
        parent = None
        for i in range((len(tokens) - 1) // bs):
            parent = hash_block(parent, tokens[i * bs : (i + 1) * bs])
            block = self.pool.cached.get(parent)
            if block is None:
                break
            hits.append(block)
        self.num_queries += len(tokens)
        self.num_hits += len(hits) * bs
        return hits

    def allocate(self, req: Request, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:  # type: ignore[assignment]
        """Give `req` blocks for `num_new_tokens` more tokens (after adopting `cached_blocks`); False if the pool is short."""
        bs = self.block_size
        num_computed = req.num_computed_tokens + len(cached_blocks) * bs
        need = -(-(num_computed + num_new_tokens) // bs) - len(req.block_table) - len(cached_blocks)
        revived = sum(1 for b in cached_blocks if self.pool.ref_counts[b] == 0)
        if need + revived > self.pool.num_free:
            return False
        if cached_blocks:
            self.pool.touch(list(cached_blocks))
            req.block_table.extend(cached_blocks)
            req.num_computed_tokens = num_computed
            self._extend_hashes(req)
        if need > 0:
            req.block_table.extend(self.pool.allocate(need))
        return True

    def cache_full_blocks(self, req: Request) -> None:
        """Register every block whose tokens are all computed (or being computed by a step in flight, which
        runs before any step that could reuse them) under its chained hash."""
        if self.enable_prefix_caching:
            for i in self._extend_hashes(req):
                self.pool.register(req.block_table[i], req.block_hashes[i])

    def reset_prefix_cache(self) -> None:
        """Forget every cached block's hash (their K/V may be wrong: a step writing them failed)."""
        self.pool.forget_hashes()

    def _extend_hashes(self, req: Request) -> range:
        bs = self.block_size
        start = len(req.block_hashes)
        # Only blocks whose tokens are all known: with overlapped scheduling a step in flight computes
        # a position whose token (sampled by the step before) is still a placeholder.
        full = min(min(req.num_computed_tokens, req.num_tokens) // bs, len(req.block_table))
        tokens = req.all_token_ids
        for i in range(start, full):
            parent = req.block_hashes[-1] if req.block_hashes else None
            req.block_hashes.append(hash_block(parent, tokens[i * bs : (i + 1) * bs]))
        return range(start, full)

    def free(self, req: Request) -> None:
        # Tail blocks first into the free queue, so they are evicted before the shared prefix.
        self.pool.free(reversed(req.block_table))
        req.block_table = []
        req.block_hashes = []


def allocate_kv_tensors(
    model: ModelConfig, cache: CacheConfig, num_blocks: int, dtype: torch.dtype, device: torch.device | str
) -> list[LayerKVCache]:
    """One cache per layer: K and V each [num_blocks, kv_heads, block_size, head_dim] (+ scales if 8-bit).

    Head-major inside a block: gathering a sequence's blocks yields each head's keys as one
    [S, D] run, which the attention matmuls read without another copy.
    """
    shape = (num_blocks, model.num_key_value_heads, cache.block_size, model.head_dim)
    kv_dtype = cache.torch_dtype(dtype)
    native = (torch.device(device).type == "cpu" and kv_dtype == torch.float32 and model.head_dim % 8 == 0
              and native_kernels_available())
    caches = []
    for _ in range(model.num_hidden_layers):
        kv = LayerKVCache(torch.zeros(shape, dtype=kv_dtype, device=device),
                          torch.zeros(shape, dtype=kv_dtype, device=device))
        if cache.quantized:
            scale_shape = (num_blocks, model.num_key_value_heads, cache.block_size // cache.quant_group)
            kv.k_scale = torch.zeros(scale_shape, dtype=torch.float32, device=device)
            kv.v_scale = torch.zeros(scale_shape, dtype=torch.float32, device=device)
            kv.group = cache.quant_group
        kv.native_decode = native
        caches.append(kv)
    return caches


# -- moving blocks between engines (prefill/decode disaggregation) -------------------------------
def kv_head_slice(num_kv_heads: int, tp_rank: int, tp_size: int) -> slice:
    """The model's KV heads that tensor-parallel rank `tp_rank` of `tp_size` keeps: an equal share, or
    with fewer heads than ranks the one head it shares with its neighbours (ModelConfig.shard and the
    loader's column split)."""
    if num_kv_heads >= tp_size:
        n = num_kv_heads // tp_size
        return slice(tp_rank * n, (tp_rank + 1) * n)
    head = tp_rank * num_kv_heads // tp_size
    return slice(head, head + 1)


def join_kv_heads(shards: list[list[list[torch.Tensor]]], num_kv_heads: int) -> list[list[torch.Tensor]]:
    """Per layer, per tensor: the tp ranks' blocks (shards[rank], heads on dim 1) joined into all the
    model's heads, each head taken once."""
    tp = len(shards)
    owners, seen = [], set()
    for rank in range(tp):
        start = kv_head_slice(num_kv_heads, rank, tp).start
        if start not in seen:
            seen.add(start)
            owners.append(rank)
    if len(owners) == 1:
        return shards[owners[0]]
    return [[torch.cat([shards[r][layer][i] for r in owners], dim=1) for i in range(len(shards[0][layer]))]
            for layer in range(len(shards[0]))]


def block_bytes(t: torch.Tensor) -> int:
    """Bytes of one block of a KV tensor (blocks on its first dimension)."""
    return t[:1].numel() * t.element_size()


def block_runs(ids: list[int]) -> list[tuple[int, int, int]]:
    """(position in ids, first block, count) of each run of consecutive block ids."""
    runs: list[tuple[int, int, int]] = []
    for i, b in enumerate(ids):
        if runs and runs[-1][1] + runs[-1][2] == b:
            pos, first, n = runs[-1]
            runs[-1] = (pos, first, n + 1)
        else:
            runs.append((i, b, 1))
    return runs


def scatter_blocks(dest: torch.Tensor, runs: list[tuple[int, int, int]], src: torch.Tensor) -> None:
    """dest[ids[i]] = src[i], one slice copy per run of consecutive ids (index_copy_ on int8 is 20x slower)."""
    for pos, first, n in runs:
        dest[first:first + n].copy_(src[pos:pos + n])


def read_blocks(caches: list[LayerKVCache], block_ids: list[int]) -> list[list[torch.Tensor]]:
    """Host copies of blocks `block_ids` of every layer, per layer in LayerKVCache.tensors() order."""
    index = torch.tensor(block_ids, dtype=torch.long, device=caches[0].k.device)
    return [[t.index_select(0, index).cpu() for t in cache.tensors()] for cache in caches]


def write_blocks(caches: list[LayerKVCache], block_ids: list[int], data: list[list[torch.Tensor]],
                 heads: slice | None = None) -> None:
    """The inverse of read_blocks: data's blocks (of KV heads `heads` of them, or all) into `block_ids`."""
    if len(data) != len(caches):
        raise ValueError(f"{len(data)} layers of blocks for a cache of {len(caches)}")
    runs = block_runs(block_ids)
    for cache, layer in zip(caches, data):
        for dest, src in zip(cache.tensors(), layer, strict=True):
            part = src if heads is None else src[:, heads]
            scatter_blocks(dest, runs, part.to(dest.device, non_blocking=True))


def move_kv_slots(caches: list[LayerKVCache], moves: list[tuple[int, int]], block_size: int) -> None:
    """Copy the K/V at slot `src` to slot `dst` for each (src, dst), in every layer: a verified token tree's
    accepted nodes into a chain's slots. All sources are read before any destination is written."""
    assert all(cache.k_scale is None for cache in caches), "8-bit caches share scales between slots"
    device = caches[0].k.device
    src = torch.tensor([m[0] for m in moves], dtype=torch.long, device=device)
    dst = torch.tensor([m[1] for m in moves], dtype=torch.long, device=device)
    src_index = (src // block_size, slice(None), src % block_size)  # [n, Hk, D] of a [blocks, Hk, page, D] tensor
    dst_index = (dst // block_size, slice(None), dst % block_size)
    for cache in caches:
        for t in (cache.k, cache.v):
            t[dst_index] = t[src_index]
