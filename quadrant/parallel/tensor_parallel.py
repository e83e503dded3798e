"""Tensor and expert parallelism applied to a built model, before its weights are loaded.

The model is built from `ModelConfig.shard(tp)`, so its layers already have this rank's shapes
(its heads, its slice of each MLP). Here each layer learns which slice of a checkpoint tensor is
its own, through its parameters' weight loaders, and which group sums or gathers its outputs:
column-parallel projections (the model's `tp_plan` says which) keep their rows of each packed
part, row-parallel ones their columns plus an all-reduce, the embedding and LM head a slice of the
vocabulary, the experts their share of experts and of each expert's width. Because the slices are
taken as tensors load, before any repacking, every weight format runs sharded. Model code stays
single-device code.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from quadrant.layers.embedding import LMHead, VocabEmbedding, VocabShard
from quadrant.layers.linear import Linear, MergedLinear
from quadrant.layers.moe import Experts
from quadrant.parallel.eplb import plan_placement
from quadrant.parallel.expert_parallel import ExpertDispatch
from quadrant.parallel.groups import ParallelState

Loader = Callable[[torch.Tensor, torch.Tensor, "str | None"], object]
Grid = Callable[[torch.Tensor], torch.Tensor]


def parallelize(model: nn.Module, state: ParallelState, vocab_size: int, grid: Grid | None = None) -> None:
    """Shard `model` (built from config.shard(state.tp_size)) for this rank; call before loading.

    `grid` rounds a whole weight onto its quantised format's grid. Layers split along their inputs
    (row-parallel linears, the experts' down projections) take their slice of the rounded weight,
    so a per-channel scale or a 4-bit group spans the whole row as in one process, and the shard
    packs exactly those values (on_grid)."""
    plan: dict[str, str] = getattr(model, "tp_plan", {})
    for name, module in model.named_modules():
        if isinstance(module, Experts):
            _place_experts(module, state)
            module.grid = grid
        if state.tp_size == 1:
            continue
        style = next((s for suffix, s in plan.items() if name.endswith(suffix)), None)
        if isinstance(module, (Linear, VocabEmbedding, LMHead)) and style is None:
            raise ValueError(f"{type(model).__name__}.tp_plan does not say how to split {name}")
        if style == "column":
            assert isinstance(module, MergedLinear), f"{name}: column-parallel layers are packed (MergedLinear)"
            _column(module, state.tp_rank, state.tp_size)
        elif style == "row":
            assert isinstance(module, Linear)
            _row(module, state, grid)
        elif style == "vocab":
            assert isinstance(module, (VocabEmbedding, LMHead))
            _vocab(module, state, vocab_size)


def _column(layer: MergedLinear, rank: int, size: int) -> None:
    """Each packed part keeps its rank's rows. A part with fewer shards than ranks (KV heads under a
    larger tp) is replicated: ranks rank * shards // size share shard number (rank * shards // size)."""
    for param in (layer.weight, layer.bias):
        if param is None:
            continue
        fill: Loader = param.weight_loader  # type: ignore[attr-defined]

        def load(p: torch.Tensor, loaded: torch.Tensor, shard: str | None, fill: Loader = fill) -> object:
            assert shard is not None, "a column-parallel layer loads its parts one by one"
            local = layer.shard_offsets[shard][1]
            num_shards = loaded.shape[0] // local
            return fill(p, loaded.narrow(0, rank * num_shards // size * local, local), shard)

        param.weight_loader = load  # type: ignore[attr-defined]


def _row(layer: Linear, state: ParallelState, grid: Grid | None) -> None:
    """The rank's input columns; partial outputs are summed over the group, so the bias is added once."""
    layer.tp_group = state.tp_group
    rank = state.tp_rank

    def load_weight(p: torch.Tensor, loaded: torch.Tensor, shard: str | None) -> None:
        whole = grid(loaded) if grid is not None else loaded
        _copy(p, whole.narrow(1, rank * p.shape[1], p.shape[1]))

    def load_bias(p: torch.Tensor, loaded: torch.Tensor, shard: str | None) -> None:
        _copy(p, loaded if rank == 0 else torch.zeros_like(loaded))

    layer.weight.weight_loader = load_weight  # type: ignore[attr-defined]
    if layer.bias is not None:
        layer.bias.weight_loader = load_bias  # type: ignore[attr-defined]


def _vocab(layer: VocabEmbedding | LMHead, state: ParallelState, vocab_size: int) -> None:
    """A contiguous slice of ceil(V / tp) vocabulary rows; rows past V stay zero."""
    assert state.tp_group is not None
    local = -(-vocab_size // state.tp_size)
    start = state.tp_rank * local
    layer.shard = VocabShard(start, vocab_size, state.tp_group)
    if layer.weight is None:
        return  # a tied head reads the (sharded) embedding's matrix
    layer.weight = nn.Parameter(torch.zeros(local, layer.weight.shape[1], dtype=layer.weight.dtype,
                                            device=layer.weight.device))

    def load(p: torch.Tensor, loaded: torch.Tensor, shard: str | None) -> None:
        rows = loaded[start : start + local]
        p.data.zero_()
        _copy(p.data[: rows.shape[0]], rows)

    layer.weight.weight_loader = load  # type: ignore[attr-defined]


def _place_experts(experts: Experts, state: ParallelState) -> None:
    ep, num_experts = state.ep_size, experts.num_experts
    slots_per_rank = (num_experts + state.num_redundant_experts) // ep
    placement = plan_placement([0] * num_experts, ep, slots_per_rank)  # no load measured yet: spread evenly
    experts.place(placement[state.ep_rank * slots_per_rank : (state.ep_rank + 1) * slots_per_rank],
                  state.tp_rank, state.tp_size)
    experts.tp_group = state.tp_group
    if ep > 1:
        assert state.ep_group is not None
        group_ranks = [e * state.tp_size + state.tp_rank for e in range(ep)]
        experts.dispatch = ExpertDispatch(state.ep_rank, ep, slots_per_rank, state.ep_group, group_ranks,
                                          placement, num_experts)
        # Each token's result lives on the rank that routed it, and (under tp too) as tp partial
        # sums: one all-reduce over every rank gathers and sums both.
        experts.reduce_group = state.world_group
    elif state.tp_size > 1:
        experts.reduce_group = state.tp_group


def _copy(target: torch.Tensor, loaded: torch.Tensor) -> None:
    if target.shape != loaded.shape:
        raise ValueError(f"expected a slice of shape {tuple(target.shape)}, got {tuple(loaded.shape)}")
    target.copy_(loaded)
