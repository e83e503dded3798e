"""Parallelism applied to a TrainingModel from outside the model code (torchtitan's split).

- Tensor parallel + sequence parallel (DTensor, `apply_tp`): attention heads and FFN columns are
  split across the tp ranks; between sub-layers the token stream is sharded by token (norms and
  residual adds run on 1/tp of the tokens), all-gathered before the column-parallel projections
  and reduce-scattered after the row-parallel ones. The packed projections (qkv, gate_up) are
  stored head-interleaved by rank so that each rank's row shard holds its own q, k and v (gate and
  up) parts; `canonical_merged` undoes it for export.
- FSDP2 (`apply_fsdp`): `fully_shard` on every decoder layer, then the root (ZeRO-3).
- Pipeline parallel (`build_pipeline`): the decoder layers split into contiguous stages, each rank
  one stage, run by torch.distributed.pipelining's 1F1B schedule.
- Activation checkpointing and torch.compile per decoder layer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor

from quadrant.layers.linear import MergedLinear
from quadrant.layers.moe import Router, SparseMoeBlock
from quadrant.layers.norm import RMSNorm
from quadrant.train.config import TrainConfigError
from quadrant.train.model import packed_metadata, token_loss

# --------------------------------------------------------------------------------- tensor parallel


def interleave_merged(weight: torch.Tensor, sizes: list[int], tp: int) -> torch.Tensor:
    """Rows [p0; p1; ...] -> [p0_r0; p1_r0; ...; p0_r1; p1_r1; ...]: rank r's contiguous row shard
    then holds the r-th slice of every part."""
    parts = [p.chunk(tp) for p in weight.split(sizes)]
    return torch.cat([parts[i][r] for r in range(tp) for i in range(len(sizes))])


def canonical_merged(weight: torch.Tensor, sizes: list[int], tp: int) -> torch.Tensor:
    """The inverse of interleave_merged (for export of a tensor-parallel checkpoint)."""
    local = [s // tp for s in sizes]
    chunks = weight.split(local * tp)
    return torch.cat([chunks[r * len(sizes) + i] for i in range(len(sizes)) for r in range(tp)])


def _distribute_params(module: nn.Module, mesh: DeviceMesh, placement: Any = Replicate()) -> None:
    """Turn the module's own parameters into DTensors with one placement."""
    for name, param in list(module.named_parameters(recurse=False)):
        module.register_parameter(name, nn.Parameter(distribute_tensor(param.data, mesh, [placement]),
                                                     requires_grad=param.requires_grad))


def _distribute(module: nn.Module, mesh: DeviceMesh, placement: Any, inputs: Callable[..., Any],
                outputs: Callable[..., Any]) -> None:
    """The module's parameters placed so, its inputs and outputs converted by the given hooks."""
    distribute_module(module, mesh, lambda _n, m, _d: _distribute_params(m, mesh, placement),
                      cast(Any, inputs), cast(Any, outputs))


def _to_dtensor(x: Any, mesh: DeviceMesh, placement: Any) -> Any:
    if isinstance(x, torch.Tensor) and not isinstance(x, DTensor):
        return DTensor.from_local(x, mesh, [placement], run_check=False)
    return x


def _sequence_parallel(module: nn.Module, mesh: DeviceMesh, dim: int = 0, local_output: bool = False) -> None:
    """Replicated weights; inputs sharded along `dim` (token or head) and kept so."""
    def inputs(_m: nn.Module, args: tuple, _mesh: DeviceMesh) -> tuple:
        return tuple(_to_dtensor(a, mesh, Shard(dim)) for a in args)

    def outputs(_m: nn.Module, out: Any, _mesh: DeviceMesh) -> Any:
        return out.to_local() if local_output else out

    _distribute(module, mesh, Replicate(), inputs, outputs)


def _column_parallel(module: nn.Module, mesh: DeviceMesh) -> None:
    """Weight rows sharded; the token-sharded input is all-gathered; each rank keeps its output columns."""
    def inputs(_m: nn.Module, args: tuple, _mesh: DeviceMesh) -> tuple:
        x = _to_dtensor(args[0], mesh, Shard(0))
        return (x.redistribute(mesh, [Replicate()]), *args[1:])

    def outputs(_m: nn.Module, out: DTensor, _mesh: DeviceMesh) -> torch.Tensor:
        return out.to_local()

    _distribute(module, mesh, Shard(0), inputs, outputs)


def _row_parallel(module: nn.Module, mesh: DeviceMesh) -> None:
    """Weight columns sharded; partial sums reduce-scattered back to the token-sharded stream."""
    def inputs(_m: nn.Module, args: tuple, _mesh: DeviceMesh) -> tuple:
        return (_to_dtensor(args[0], mesh, Shard(args[0].dim() - 1)), *args[1:])

    def outputs(_m: nn.Module, out: DTensor, _mesh: DeviceMesh) -> DTensor:
        return out.redistribute(mesh, [Shard(0)])

    _distribute(module, mesh, Shard(1), inputs, outputs)


def _tp_embedding(module: nn.Module, mesh: DeviceMesh) -> None:
    """Replicated table; its output is cut into the token shards the first norm expects."""
    def inputs(_m: nn.Module, args: tuple, _mesh: DeviceMesh) -> tuple:
        return (_to_dtensor(args[0], mesh, Replicate()),)

    def outputs(_m: nn.Module, out: DTensor, _mesh: DeviceMesh) -> DTensor:
        return out.redistribute(mesh, [Shard(0)])

    _distribute(module, mesh, Replicate(), inputs, outputs)


def _localise_merged(linear: MergedLinear, tp: int) -> None:
    sizes = [size for _, size in linear.shard_offsets.values()]
    with torch.no_grad():
        linear.weight.data = interleave_merged(linear.weight.data, sizes, tp)
        if linear.bias is not None:
            linear.bias.data = interleave_merged(linear.bias.data[:, None], sizes, tp)[:, 0]
    start = 0
    for name, (_, size) in list(linear.shard_offsets.items()):
        linear.shard_offsets[name] = (start, size // tp)
        start += size // tp


def apply_tp(model: Any, mesh: DeviceMesh) -> None:
    """Tensor + sequence parallel over `mesh` (1-D). Changes the modules in place."""
    tp = mesh.size()
    c = model.config
    if c.num_experts:
        raise TrainConfigError("tensor parallel for MoE layers is not supported; use FSDP (dp_shard) for MoE models")
    if c.attention_bias or c.mlp_bias or c.qk_norm_full:
        raise TrainConfigError("tensor parallel needs bias-free o_proj/down_proj and per-head q/k norms")
    for layer in decoder_layers(model):
        attn = layer.self_attn
        _localise_merged(attn.qkv_proj, tp)
        attn.num_heads //= tp
        attn.num_kv_heads //= tp
        attn.q_size //= tp
        attn.kv_size //= tp
        attn.attn.num_heads //= tp
        attn.attn.num_kv_heads //= tp
        _column_parallel(attn.qkv_proj, mesh)
        _row_parallel(attn.o_proj, mesh)
        if hasattr(attn, "q_norm"):  # per-head norms over this rank's heads: the head dim is sharded
            _sequence_parallel(attn.q_norm, mesh, dim=1, local_output=True)
            _sequence_parallel(attn.k_norm, mesh, dim=1, local_output=True)
        _localise_merged(layer.mlp.gate_up_proj, tp)
        _column_parallel(layer.mlp.gate_up_proj, mesh)
        _row_parallel(layer.mlp.down_proj, mesh)
        for module in layer.children():
            if isinstance(module, RMSNorm):
                _sequence_parallel(module, mesh)
    if model.model.embed_tokens is not None:  # (absent from later pipeline stages)
        _tp_embedding(model.model.embed_tokens, mesh)
    if model.model.norm is not None:
        _sequence_parallel(model.model.norm, mesh)
    if model.lm_head is not None and model.lm_head.weight is not None:
        _distribute_params(model.lm_head, mesh)


def tp_layout(model: nn.Module) -> dict[str, list[int]]:
    """Packed parameter name -> its parts' canonical row counts (for canonical_merged at export)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, MergedLinear):
            out[f"{name}.weight"] = [size for _, size in module.shard_offsets.values()]
    return out


# --------------------------------------------------------------------------------- FSDP2, AC, compile


def decoder_layers(model: Any) -> list[Any]:
    layers = model.model.layers
    return list(layers.values()) if isinstance(layers, nn.ModuleDict) else list(layers)


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype | None) -> None:
    """ZeRO-3: each decoder layer is one FSDP unit (gathered just before it runs), the rest the root's."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    # Router biases steer only the top-k choice and move by identical all-reduced steps on every
    # rank (aux-loss-free balancing): kept whole, outside FSDP.
    ignored = {m.e_score_correction_bias for m in model.modules()
               if isinstance(m, Router) and m.e_score_correction_bias is not None}
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp, ignored_params=ignored or None)
    fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=ignored or None)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in backward instead of keeping its activations (names unchanged)."""
    from torch.utils.checkpoint import checkpoint

    for layer in decoder_layers(model):
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)  # type: ignore[method-assign]


def apply_compile(model: nn.Module) -> None:
    for layer in decoder_layers(model):
        layer.compile()


def has_moe(model: nn.Module) -> bool:
    return any(isinstance(m, SparseMoeBlock) for m in model.modules())


# --------------------------------------------------------------------------------- pipeline parallel


def stage_layers(num_layers: int, num_stages: int) -> list[range]:
    """Contiguous, near-equal layer ranges, earlier stages taking the remainder."""
    base, extra = divmod(num_layers, num_stages)
    bounds = [0]
    for s in range(num_stages):
        bounds.append(bounds[-1] + base + (s < extra))
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


class PipelineStageModule(nn.Module):
    """One stage's share of a TrainingModel, under the same parameter names.

    First stage: input_ids -> embed -> its layers. Later stages: (hidden, residual) -> their layers.
    Every stage but the last sends (hidden, residual) on, in fp32 whatever the compute dtype (one
    wire format for the schedule's buffers); the last applies the final norm and the LM head and
    returns fp32 logits. Positions (rotary and document boundaries) do not travel through the pipe:
    every stage has the step's batch, so `feed_positions` hands each stage its microbatches'
    positions, which its forwards consume in order (1F1B runs forwards in microbatch order)."""

    model: Any  # the family's decoder (LlamaModel), layers pruned to this stage's
    lm_head: Any

    def __init__(self, full: Any, stage: int, num_stages: int) -> None:
        super().__init__()
        # TrainConfig refuses tied embeddings with pp > 1: the embedding and the head live on different stages.
        assert not (full.config.tie_word_embeddings and num_stages > 1)
        keep = stage_layers(full.config.num_hidden_layers, num_stages)[stage]
        self.config = full.config
        self.first, self.last = stage == 0, stage == num_stages - 1
        self.model = full.model
        self.model.layers = nn.ModuleDict({str(i): full.model.layers[i] for i in keep})  # type: ignore[assignment]
        if not self.first:
            self.model.embed_tokens = None  # type: ignore[assignment]
        if not self.last:
            self.model.norm = None  # type: ignore[assignment]
        self.lm_head = full.lm_head if self.last else None
        self._positions: list[torch.Tensor] = []
        # With tensor parallel the stream between layers is token-sharded: stages exchange it whole
        # (every tp rank sends its peer the full tensor) and re-shard it on arrival.
        self.sequence_mesh: DeviceMesh | None = None

    def feed_positions(self, microbatches: list[torch.Tensor]) -> None:
        self._positions = list(microbatches)

    def forward(self, *args: torch.Tensor) -> Any:
        positions = self._positions.pop(0)  # [b, S] of this microbatch
        if self.first:
            hidden = self.model.embed_tokens(args[0].reshape(-1))
            residual: Any = None  # the first layer starts the residual stream
        else:
            hidden, residual = args
            if self.sequence_mesh is not None:
                mesh = self.sequence_mesh
                hidden, residual = (DTensor.from_local(t, mesh, [Replicate()], run_check=False).redistribute(
                    mesh, [Shard(0)]) for t in (hidden, residual))
        rope = self.model.rope_tables(positions.reshape(-1), hidden.dtype)
        meta = packed_metadata(positions)
        for layer in self.model.layers.values():
            hidden, residual = layer(hidden, residual, rope, meta)
        if not self.last:
            return tuple(_whole(t).float() for t in (hidden, residual))
        hidden, _ = self.model.norm(hidden, residual)
        return _whole(self.lm_head(hidden)).float()


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def build_pipeline(stage_module: Any, stage: int, num_stages: int, mesh: DeviceMesh,
                   microbatches: int, micro_shape: tuple[int, int], device: torch.device,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Any:
    """A 1F1B schedule over this rank's stage, for microbatches of micro_shape = (sequences, seq_len);
    `loss_fn(logits, labels)` runs on the last stage."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    # Activation shapes given up front: shape inference would run a stage on uninitialised inputs,
    # and positions index the rotary tables.
    c = stage_module.config
    num_tokens = micro_shape[0] * micro_shape[1]
    ids = torch.zeros(micro_shape, dtype=torch.long, device=device)
    hidden = torch.zeros(num_tokens, c.hidden_size, device=device, requires_grad=True)  # gradients flow back
    carried = (hidden, hidden.detach().clone().requires_grad_())
    inputs = (ids,) if stage_module.first else carried
    outputs = torch.zeros(num_tokens, c.vocab_size, device=device) if stage_module.last else carried
    pipe_stage = PipelineStage(stage_module, stage, num_stages, device, input_args=inputs, output_args=outputs,
                               group=mesh.get_group())
    # Gradients come out as the sum over microbatches: loss_fn already divides by the step's token count.
    return Schedule1F1B(pipe_stage, microbatches, loss_fn=loss_fn, scale_grads=False)


def pipeline_loss(total_tokens: list[float]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Mean token loss over a whole step: each microbatch's sum divided by total_tokens[0], set before
    each step to the step's token count (over dp, for FSDP's gradient averaging to undo)."""
    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss, _ = token_loss(logits, labels)
        return loss / total_tokens[0]

    return loss_fn


