"""ModelRunner: turns a SchedulerOutput into one flattened forward pass and sampled tokens.

It owns the KV tensors (bound into every Attention layer), builds input ids,
positions, slot mapping, block tables and AttentionMetadata, runs the model,
computes logits only at the rows that sample, and calls the sampler.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quadrant.config import CacheConfig, ModelConfig
from quadrant.engine.kv_cache import allocate_kv_tensors
from quadrant.engine.request import Request, TokenLogprob
from quadrant.engine.scheduler import SchedulerOutput
from quadrant.layers.attention import Attention, AttentionMetadata
from quadrant.layers.sampler import sample


class ModelRunner:
    def __init__(self, model: nn.Module, model_config: ModelConfig, cache_config: CacheConfig,
                 num_blocks: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.model: Any = model  # a models/ causal LM: forward + compute_logits
        self.block_size = cache_config.block_size
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)  # for unseeded requests
        self.generator.seed()
        self.kv_caches = allocate_kv_tensors(model_config, cache_config, num_blocks, dtype, device)
        layers = [m for m in model.modules() if isinstance(m, Attention)]
        assert len(layers) == len(self.kv_caches)
        for layer, kv in zip(layers, self.kv_caches):
            layer.kv_cache = kv

    def prepare(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts, seq_lens = [0], []
        bs = self.block_size
        for s in out.scheduled:
            req, start = s.request, s.request.num_computed_tokens
            end = start + s.num_new_tokens
            input_ids.extend(req.token_slice(start, end))
            table = req.block_table
            for pos in range(start, end):
                positions.append(pos)
                slots.append(table[pos // bs] * bs + pos % bs)
            starts.append(starts[-1] + s.num_new_tokens)
            seq_lens.append(end)
        width = max(len(s.request.block_table) for s in out.scheduled)
        tables = [s.request.block_table + [0] * (width - len(s.request.block_table)) for s in out.scheduled]
        dev = self.device
        slot_mapping = torch.tensor(slots, dtype=torch.int64, device=dev)
        meta = AttentionMetadata(
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            max_query_len=max(s.num_new_tokens for s in out.scheduled),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=starts,
            seq_lens_cpu=seq_lens,
            slot_mapping=slot_mapping,
            slot_block=slot_mapping // bs,
            slot_offset=slot_mapping % bs,
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=dev)  # [T]
        positions_t = torch.tensor(positions, dtype=torch.long, device=dev)  # [T]
        return ids, positions_t, meta

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> dict[str, tuple[int | None, TokenLogprob | None]]:
        """Run one step; returns {request_id: (sampled token, logprob record)} for the rows that sample."""
        ids, pos, meta = self.prepare(out)
        hidden = self.model(ids, pos, meta)  # [T, D]
        rows = [i for i, s in enumerate(out.scheduled) if s.samples]
        if not rows:
            return {}
        last = torch.tensor([meta.query_start_loc_cpu[i + 1] - 1 for i in rows], device=self.device)
        logits = self.model.compute_logits(hidden[last])  # [N, V] fp32
        requests: list[Request] = [out.scheduled[i].request for i in rows]
        tokens, records = sample(logits, requests, self.generator)
        return {r.request_id: (t, lp) for r, t, lp in zip(requests, tokens, records)}
