"""Decode-only steps replayed from CUDA graphs, one graph per padded batch size.

A decode step of a small model is dozens of kernel launches of a few microseconds each:
launching them from Python costs more than running them. Each graph holds the whole
forward over static input buffers, up to the final hidden states (the LM head runs after the
replay, and an EAGLE head reads those states too). A step fills the buffers for its real
rows and pads to the next captured size with rows that write nothing (slot -1) and attend
to nothing (length 0). The split-KV grid depth is fixed per graph; the chunk length, a
device scalar, follows the batch (kernels/paged_decode.py). With `trees`, the graphs also take
each row's token-tree span and ancestor bits, so speculative token trees verify through them
(each node a decode row). Off CUDA (tests) the same buffers run the forward eagerly, so the
padding logic is exercised on CPU too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from quadrant.kernels.paged_decode import grid_splits, num_sms, plan_splits
from quadrant.layers.attention import AttentionMetadata


NO_SPAN = 2**31 - 1  # tree_start of a row that is not a token tree's node: every key attended


def default_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then every multiple of 8 up to max_num_seqs (and max_num_seqs itself)."""
    sizes = [s for s in (1, 2, 4) if s <= max_num_seqs] + list(range(8, max_num_seqs + 1, 8))
    return sorted(set(sizes + [max_num_seqs]))


class DecodeGraphs:
    def __init__(self, model: Any, batch_sizes: list[int], block_size: int, max_blocks_per_seq: int,
                 num_kv_heads: int, device: torch.device, trees: bool = False) -> None:
        self.model = model
        self.trees = trees
        self.block_size = block_size
        self.sizes = sorted(set(batch_sizes))
        self.device = device
        self.num_kv_heads = num_kv_heads
        self.num_sms = num_sms(device)
        max_bs = self.sizes[-1]
        self.max_blocks = max_blocks_per_seq
        with torch.device(device):
            self.input_ids = torch.zeros(max_bs, dtype=torch.long)  # [B]
            self.positions = torch.zeros(max_bs, dtype=torch.long)  # [B]
            self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.long)  # [B]
            self.seq_lens = torch.zeros(max_bs, dtype=torch.int32)  # [B]
            self.block_tables = torch.zeros(max_bs, max_blocks_per_seq, dtype=torch.int32)  # [B, W]
            self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32)  # [B + 1]: one token each
            self.chunk = torch.zeros(1, dtype=torch.int32)
            # Token trees (AttentionMetadata.tree_start / tree_mask). A plain row's span starts past any
            # context, so plain steps leave these buffers alone (no host copies) until a tree step.
            self.tree_start = torch.full((max_bs,), NO_SPAN, dtype=torch.int32) if trees else None  # [B]
            self.tree_mask = torch.full((max_bs,), -1, dtype=torch.int64) if trees else None  # [B]
        self._tree_written = False  # a tree step wrote the buffers: the next plain step resets them
        self.row_valid = torch.zeros(max_bs, dtype=torch.long, device=device)  # [B]: 1 for real rows
        self.splits = {bs: grid_splits(bs, num_kv_heads, self.num_sms) for bs in self.sizes}
        from quadrant.layers.moe import Experts

        self._experts = [m for m in model.modules() if isinstance(m, Experts)]
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def fits(self, num_seqs: int, num_blocks: int) -> bool:
        return num_seqs <= self.sizes[-1] and num_blocks <= self.max_blocks

    def _metadata(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            max_query_len=1,
            max_seq_len=self.max_blocks * self.block_size,
            query_start_loc_cpu=list(range(bs + 1)),
            seq_lens_cpu=[1] * bs,  # host copies are for the torch backend; graphs run the triton one
            slot_mapping=self.slot_mapping[:bs],
            block_tables=self.block_tables[:bs],
            decode_num_splits=self.splits[bs],
            decode_chunk=self.chunk,
            tree_start=None if self.tree_start is None else self.tree_start[:bs],
            tree_mask=None if self.tree_mask is None else self.tree_mask[:bs],
        )

    def _forward(self, bs: int) -> torch.Tensor:
        """Final hidden states [bs, D]: the LM head runs after the replay, so the graphs keep [bs, D]
        outputs, not [bs, V] logits each (2 GB for Llama 3's vocabulary over 35 graphs)."""
        return self.model(self.input_ids[:bs], self.positions[:bs], self._metadata(bs))

    @contextmanager
    def _counting_real_rows(self) -> Iterator[None]:
        """MoE router statistics count only real rows: padding rows are routed too, but uncounted."""
        for m in self._experts:
            m.count_mask = self.row_valid
        try:
            yield
        finally:
            for m in self._experts:
                m.count_mask = None

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every batch size, largest first so the smaller graphs reuse its memory pool."""
        if self.device.type != "cuda":
            return
        self.chunk.fill_(plan_splits([1], self.num_kv_heads, self.num_sms)[1])
        pool = None
        for bs in reversed(self.sizes):
            self._forward(bs)  # compiles this shape's kernels outside the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with self._counting_real_rows(), torch.cuda.graph(graph, pool=pool):
                hidden = self._forward(bs)
            pool = graph.pool()
            self.graphs[bs] = (graph, hidden)
        torch.cuda.synchronize(self.device)
        for m in self._experts:
            m.reset_stats()  # the warm-up passes routed nothing real

    @torch.inference_mode()
    def run(self, input_ids: list[int], positions: list[int], slots: list[int], seq_lens: list[int],
            block_tables: list[list[int]], tree: tuple[list[int], list[int]] | None = None) -> torch.Tensor:
        """Final hidden states [n, D] of a decode-only step of n <= the largest captured size: a view of
        the graph's output, overwritten by its next replay. `tree`: each row's token-tree span start and
        ancestor bits (graphs captured with `trees` only)."""
        n = len(input_ids)
        bs = next(s for s in self.sizes if s >= n)
        pad = bs - n
        self.input_ids[:bs].copy_(torch.tensor(input_ids + [0] * pad), non_blocking=True)
        self.positions[:bs].copy_(torch.tensor(positions + [0] * pad), non_blocking=True)
        self.slot_mapping[:bs].copy_(torch.tensor(slots + [-1] * pad), non_blocking=True)
        self.seq_lens[:bs].copy_(torch.tensor(seq_lens + [0] * pad, dtype=torch.int32), non_blocking=True)
        width = max(len(t) for t in block_tables)
        rows = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32)
        self.block_tables[:n, :width].copy_(rows, non_blocking=True)
        if self.tree_start is not None and self.tree_mask is not None:
            if tree is not None:
                spans, bits = tree
                self.tree_start[:bs].copy_(torch.tensor(spans + [NO_SPAN] * pad, dtype=torch.int32),
                                           non_blocking=True)
                self.tree_mask[:bs].copy_(torch.tensor(bits + [-1] * pad, dtype=torch.int64), non_blocking=True)
                self._tree_written = True
            elif self._tree_written:
                self.tree_start.fill_(NO_SPAN)
                self.tree_mask.fill_(-1)
                self._tree_written = False
        else:
            assert tree is None, "these graphs were captured without token-tree inputs"
        _, chunk = plan_splits(seq_lens, self.num_kv_heads, self.num_sms, max_splits=self.splits[bs])
        self.chunk.fill_(chunk)
        self.row_valid[:bs].copy_(torch.tensor([1] * n + [0] * pad), non_blocking=True)
        if bs in self.graphs:
            graph, hidden = self.graphs[bs]
            graph.replay()
        else:
            with self._counting_real_rows():
                hidden = self._forward(bs)
        return hidden[:n]
