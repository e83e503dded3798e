"""ModelRunner: turns scheduled sequences into one flattened forward pass.

It owns the KV tensors (bound into every Attention layer), builds input ids,
positions, slot mapping, block tables and AttentionMetadata for a batch of
(sequence, new-token count) pairs, and returns the logits of each sequence's
last scheduled token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quadrant.config import CacheConfig, ModelConfig
from quadrant.engine.kv_cache import allocate_kv_tensors
from quadrant.layers.attention import Attention, AttentionMetadata


@dataclass
class ScheduledSeq:
    token_ids: list[int]  # all tokens of the sequence so far (prompt + generated)
    num_computed: int  # tokens whose K/V are already cached
    num_new: int  # tokens to run this step: token_ids[num_computed : num_computed + num_new]
    block_table: list[int]


class ModelRunner:
    def __init__(self, model: nn.Module, model_config: ModelConfig, cache_config: CacheConfig,
                 num_blocks: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.model = model
        self.block_size = cache_config.block_size
        self.device = torch.device(device)
        self.kv_caches = allocate_kv_tensors(model_config, cache_config, num_blocks, dtype, device)
        layers = [m for m in model.modules() if isinstance(m, Attention)]
        assert len(layers) == len(self.kv_caches)
        for layer, kv in zip(layers, self.kv_caches):
            layer.kv_cache = kv

    def prepare(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts, seq_lens = [0], []
        bs = self.block_size
        for s in batch:
            end = s.num_computed + s.num_new
            input_ids.extend(s.token_ids[s.num_computed:end])
            for pos in range(s.num_computed, end):
                positions.append(pos)
                slots.append(s.block_table[pos // bs] * bs + pos % bs)
            starts.append(starts[-1] + s.num_new)
            seq_lens.append(end)
        width = max(len(s.block_table) for s in batch)
        tables = [s.block_table + [0] * (width - len(s.block_table)) for s in batch]
        dev = self.device
        meta = AttentionMetadata(
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            max_query_len=max(s.num_new for s in batch),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=starts,
            seq_lens_cpu=seq_lens,
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=dev)  # [T]
        pos = torch.tensor(positions, dtype=torch.long, device=dev)  # [T]
        return ids, pos, meta

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq]) -> torch.Tensor:
        """Run the batch; returns fp32 logits [B, V] at each sequence's last scheduled token."""
        ids, pos, meta = self.prepare(batch)
        hidden = self.model(ids, pos, meta)  # [T, D]
        last = torch.tensor(meta.query_start_loc_cpu[1:], device=self.device) - 1
        return self.model.compute_logits(hidden[last])
