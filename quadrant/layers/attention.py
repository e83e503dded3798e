"""Attention layer: writes this step's K/V into the paged cache, then calls the backend.

The runner builds one AttentionMetadata per step for the flattened batch
(prefill chunks and decode tokens mixed) and binds each layer's KV cache
tensors; model code only passes q, k, v and the metadata through.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


@dataclass
class LayerKVCache:
    """One layer's paged K/V. 8-bit caches carry one fp32 scale per `group` tokens per head."""

    k: torch.Tensor  # [num_blocks, kv_heads, block_size, head_dim]
    v: torch.Tensor
    k_scale: torch.Tensor | None = None  # [num_blocks, kv_heads, block_size // group], 8-bit caches only
    v_scale: torch.Tensor | None = None
    group: int = 0
    # Decode attention through the native CPU kernel (kernels/csrc/paged_decode.c), which reads an
    # fp32 cache in place; set where the cache is allocated and the kernel runs.
    native_decode: bool = False

    @property
    def block_size(self) -> int:
        return self.k.shape[2]

    def tensors(self) -> list[torch.Tensor]:
        """The tensors its blocks live in, blocks first and KV heads second in each (scales only if 8-bit)."""
        out = [self.k, self.v]
        if self.k_scale is not None and self.v_scale is not None:
            out += [self.k_scale, self.v_scale]
        return out

    @classmethod
    def of_tensors(cls, tensors: list[torch.Tensor], group: int = 0) -> "LayerKVCache":
        """The inverse of tensors()."""
        if len(tensors) == 4:
            return cls(tensors[0], tensors[1], tensors[2], tensors[3], group=group)
        return cls(tensors[0], tensors[1])


class AttentionBackend(Protocol):
    """Writes a step's K/V into the cache, then attends; see layers/attn_backends.py."""

    def store(self, kv: LayerKVCache, k: torch.Tensor, v: torch.Tensor, meta: "AttentionMetadata") -> None: ...

    def forward(self, layer: "Attention", q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: "AttentionMetadata") -> torch.Tensor: ...


@dataclass
class AttentionMetadata:
    query_start_loc: torch.Tensor  # [B + 1] int32: cu_seqlens_q, token offsets of each sequence in the batch
    seq_lens: torch.Tensor  # [B] int32: context length of each sequence after this step (cached + new)
    max_query_len: int
    max_seq_len: int
    query_start_loc_cpu: list[int]  # host copies, so the torch backend loops without device syncs
    seq_lens_cpu: list[int]
    slot_mapping: torch.Tensor | None = None  # [T] int64: cache slot (block * block_size + offset) of each new token
    block_tables: torch.Tensor | None = None  # [B, max_blocks] int32: cache blocks of each sequence
    slot_block: torch.Tensor | None = None  # [T] int64: slot_mapping // block_size (set by the runner)
    slot_offset: torch.Tensor | None = None  # [T] int64: slot_mapping % block_size
    # Split-KV plan of a decode-only batch (triton backend): grid depth and [1] int32 chunk length.
    decode_num_splits: int = 1
    decode_chunk: torch.Tensor | None = None
    # Decode rows over block tables padded to a fixed width (compiled CPU steps): the torch backend
    # always masks by seq_lens and reads no host-side lengths.
    padded_decode: bool = False
    # Token trees (engine/spec/tree.py): each row's index where its tree span (its last token and the
    # draft nodes) starts, its context length for rows without one [B] int32; and per token the ancestor
    # bits over its row's span [T] int64 (bit j: the span's j-th token). Keys in a span are attended only
    # where the query's bit is set; the rest of the context as usual.
    tree_start: torch.Tensor | None = None
    tree_start_cpu: list[int] | None = None  # its host copy (the torch backend reads it without a device sync)
    tree_mask: torch.Tensor | None = None
    # Called after each layer has written its K/V (eager steps of a prefill engine: decode engines pull a
    # prompt layer by layer while the later layers run).
    on_layer_stored: Callable[[], None] | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @classmethod
    def for_packed_sequences(cls, seq_lens: list[int], device: torch.device | str = "cpu") -> "AttentionMetadata":
        """Causal attention within each of several packed sequences, no KV cache (training, scoring)."""
        starts = [0]
        for n in seq_lens:
            starts.append(starts[-1] + n)
        return cls(
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            max_query_len=max(seq_lens),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=starts,
            seq_lens_cpu=list(seq_lens),
        )


class Attention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        sliding_window: int | None = None,
        logit_softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.logit_softcap = logit_softcap
        self.kv_cache: LayerKVCache | None = None  # bound by the runner, with the backend
        from quadrant.layers.attn_backends import TORCH_BACKEND

        self.backend: AttentionBackend = TORCH_BACKEND

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hk, D] -> [T, Hq, D]."""
        if self.kv_cache is not None and meta.slot_mapping is not None:
            self.backend.store(self.kv_cache, k, v, meta)
            if meta.on_layer_stored is not None:
                meta.on_layer_stored()
        return self.backend.forward(self, q, k, v, meta)
