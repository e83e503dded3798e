"""Worker: one rank's share of the model, its KV cache and its runner.

In one process the engine's InProcessExecutor holds the only Worker; with tensor or expert
parallelism every worker process holds one (engine/executor.py). Start-up is in two steps
because the KV pool must be the same size on every rank: `available_kv_blocks` measures what
this rank could hold, the driver takes the smallest, then `init_cache` allocates it.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch
import torch.distributed as dist

from quadrant.config import EngineConfig
from quadrant.engine.cpu_compiled import BATCH_SIZES, compile_available
from quadrant.engine.cuda_graphs import default_batch_sizes
from quadrant.engine.kv_cache import join_kv_heads, kv_head_slice, read_blocks, write_blocks
from quadrant.engine.runner import ModelRunner
from quadrant.engine.step import StepInput, StepOutput
from quadrant.layers.attention import AttentionMetadata
from quadrant.layers.moe import Experts
from quadrant.loader.source import ModelSource
from quadrant.parallel.eplb import move_experts, plan_placement
from quadrant.parallel.groups import ParallelState


class Worker:
    def __init__(self, config: EngineConfig, source: ModelSource, weight_format: str,
                 parallel: ParallelState | None = None) -> None:
        self.config = config
        self.parallel = parallel or ParallelState()
        self.model_config = source.config.shard(self.parallel.tp_size)  # this rank's heads and widths
        self.num_kv_heads = source.config.num_key_value_heads  # the whole model's, over the tp ranks
        self.dtype = getattr(torch, config.dtype)
        if config.load_format == "dummy":
            self.model: Any = source.load_dummy_model(self.dtype, config.device, parallel=self.parallel)
        else:
            self.model = source.load_model(self.dtype, config.device, weight_format, self.parallel)
        source.release()  # unmap the checkpoint: the weights now live in the model
        _return_freed_memory()
        self.runner: ModelRunner | None = None

    def available_kv_blocks(self) -> int:
        cache = self.config.cache
        free = self._free_memory_after_warm_up() if cache.memory_fraction is not None else None
        return cache.blocks_for(self.model_config, self.dtype, free)

    @torch.inference_mode()
    def _free_memory_after_warm_up(self) -> int:
        """Free bytes on the device once a forward pass of a full token budget has run."""
        n = min(self.config.scheduler.max_num_batched_tokens, self.model_config.max_position_embeddings)
        device = self.config.device
        ids = torch.zeros(n, dtype=torch.long, device=device)
        meta = AttentionMetadata.for_packed_sequences([n], device)
        self.model.compute_logits(self.model(ids, torch.arange(n, device=device), meta)[-1:])
        if torch.device(device).type == "cuda":
            return torch.cuda.mem_get_info()[0]
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        # Ranks on one machine share its memory.
        return int(info["MemAvailable"].split()[0]) * 1024 // self.config.parallel.nprocs_per_node

    def init_cache(self, num_blocks: int, max_model_len: int) -> None:
        config = self.config
        backend = config.resolved_backend
        # Expert-parallel dispatch sizes its messages on the host: no graphs for it yet.
        graphs = config.cuda_graphs and backend == "triton" and self.parallel.ep_size == 1
        # Verification steps replay the decode graphs too, one row per token: up to 1 + k rows for each
        # request that drafts (no more than max_batch_size of them).
        rows = config.scheduler.max_num_seqs
        spec = config.speculative
        if spec.enabled:
            rows = max(rows, min(spec.max_batch_size, rows) * (1 + spec.num_speculative_tokens))
        graph_sizes = default_batch_sizes(rows) if graphs else None
        # CPU: decode steps through compiled graphs (whichever weight kernels their batch size takes).
        compiled = (config.cpu_compile and backend == "torch" and torch.device(config.device).type == "cpu"
                    and self.parallel.world_size == 1 and not config.cache.quantized and compile_available())
        self.runner = ModelRunner(self.model, self.model_config, config.cache, num_blocks, self.dtype, config.device,
                                  backend, graph_sizes, max_model_len, samples=self.parallel.is_driver_worker,
                                  compile_decode=min(BATCH_SIZES[-1], rows) if compiled else 0,
                                  compile_at_start=config.cpu_compile_at_start,
                                  keep_hidden=config.speculative.method == "eagle",
                                  graph_trees=config.speculative.tree_branches > 1)
        self.runner.capture_graphs()
        self.reset_expert_stats()  # warm-up and capture passes routed nothing real

    def execute(self, step: StepInput) -> StepOutput:
        assert self.runner is not None, "init_cache first"
        return self.runner.execute(step)

    def read_kv_blocks(self, block_ids: list[int]) -> list[list[torch.Tensor]] | None:
        """Host copies of KV blocks `block_ids` with all the model's KV heads, per layer (a prefill engine's
        finished prompt, for a decode engine). The tp ranks' head shards travel to rank 0, which joins
        them; the other ranks return None (expert-parallel ranks hold copies of the same heads)."""
        assert self.runner is not None, "init_cache first"
        p = self.parallel
        local = read_blocks(self.runner.kv_caches, block_ids) if p.ep_rank == 0 else None
        if p.world_size == 1:
            return local
        shards: list[Any] | None = [None] * p.world_size if p.is_driver_worker else None
        dist.gather_object(local, shards, dst=0, group=p.control_group)
        if shards is None:
            return None
        return join_kv_heads(shards[:p.tp_size], self.num_kv_heads)  # ranks 0..tp-1 are expert-parallel rank 0

    def write_kv_blocks(self, block_ids: list[int], data: list[list[torch.Tensor]]) -> None:
        """The inverse of read_kv_blocks: every rank keeps its own heads of `data` (all the model's)."""
        assert self.runner is not None, "init_cache first"
        p = self.parallel
        write_blocks(self.runner.kv_caches, block_ids, data, kv_head_slice(self.num_kv_heads, p.tp_rank, p.tp_size))

    def experts(self) -> dict[str, Experts]:
        return {name: m for name, m in self.model.named_modules() if isinstance(m, Experts)}

    def expert_load(self) -> dict[str, list[int]]:
        """MoE layer name -> tokens routed to each of its experts so far (summed over the ranks that
        split the tokens: the expert-parallel group)."""
        load = {}
        for name, m in self.experts().items():
            counts = m.tokens_per_expert.clone()
            if self.parallel.ep_group is not None:
                dist.all_reduce(counts, group=self.parallel.ep_group)
            load[name] = counts.tolist()
        return load

    def rebalance_experts(self) -> dict[str, list[int]]:
        """Expert parallel: re-place every MoE layer's experts by the load measured since the last
        rebalance (hot experts get the redundant slots), moving weights between ranks. Returns each
        layer's placement (the logical expert of every global slot)."""
        placements = {}
        for name, m in self.experts().items():
            dispatch = m.dispatch
            assert dispatch is not None, "rebalancing needs expert parallelism"
            if m.w13 is None or m.w2 is None:
                raise ValueError("an expert-parallel rebalance moves float expert weights; this model's "
                                 "experts are repacked into a quantised format (use --weight-format dense)")
            load = m.window_tokens.clone()
            dist.all_reduce(load, group=dispatch.group)
            new = plan_placement(load.tolist(), dispatch.size, dispatch.slots_per_rank)
            if new != dispatch.placement:
                w13, w2 = move_experts([m.w13.data, m.w2.data], dispatch.placement, new, dispatch.rank,
                                       dispatch.slots_per_rank, dispatch.group_ranks)
                spr = dispatch.slots_per_rank
                m.swap_stacks(w13, w2, new[dispatch.rank * spr : (dispatch.rank + 1) * spr])
                dispatch.set_placement(new)
            m.window_tokens.zero_()
            placements[name] = dispatch.placement
        return placements

    def reset_expert_stats(self) -> None:
        for m in self.experts().values():
            m.reset_stats()


def _return_freed_memory() -> None:
    """Hand the loader's freed buffers back to the OS (glibc keeps them otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do

