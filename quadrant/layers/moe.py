"""Mixture-of-experts FFN: a top-k router, the stacked experts, and the block that joins them.

`Router` scores experts per token (softmax, or DeepSeek-V3's sigmoid with a bias that steers only
the choice and grouped top-k) and returns (topk_weights, topk_ids). `Experts` holds every expert's
gate/up and down weights stacked, filled from per-expert Hugging Face or stacked GGUF tensors,
and runs them through kernels/fused_moe. `SparseMoeBlock` adds the shared experts some families
have. Parameter names follow Hugging Face; the model's name maps route checkpoint tensors here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from quadrant.config import ModelConfig
from quadrant.kernels.fused_moe import fused_moe, fused_moe_cpu
from quadrant.kernels.fused_norm_rope import use_fused
from quadrant.kernels.quant_moe import QuantWeights, fused_moe_q8
from quadrant.quant.formats import GpuQ8, WeightFormat, share_token_scales
from quadrant.quant.grids import int8_per_channel

if TYPE_CHECKING:
    from quadrant.parallel.expert_parallel import ExpertDispatch

_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}  # config hidden_act -> fused_moe's name


def select_experts(
    logits: torch.Tensor,
    top_k: int,
    scoring: str = "softmax",
    correction_bias: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    renormalize: bool = False,
    scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (topk_weights [T, k] fp32, topk_ids [T, k] int64).

    Scores are softmax or sigmoid of the logits. `correction_bias` [E] is added to the scores only
    to choose experts; the weights are the unbiased scores of the chosen ones. With n_group > 1 the
    experts form n_group equal groups, ranked by the sum of their two best (biased) scores, and only
    the topk_group best groups are eligible (DeepSeek-V3). Then optional renormalisation to sum 1,
    then scaling_factor.
    """
    scores = logits.float().sigmoid() if scoring == "sigmoid" else logits.float().softmax(dim=-1)  # [T, E]
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if n_group > 1:
        num_tokens, num_experts = choice.shape
        grouped = choice.view(num_tokens, n_group, num_experts // n_group)  # [T, G, E/G]
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
        best_groups = group_scores.topk(topk_group, dim=-1).indices  # [T, topk_group]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)  # [T, G]
        eligible = keep[:, :, None].expand_as(grouped).reshape(num_tokens, num_experts)  # [T, E]
        choice = choice.masked_fill(~eligible, float("-inf"))
    topk_ids = choice.topk(top_k, dim=-1).indices  # [T, k]
    topk_weights = scores.gather(1, topk_ids)  # [T, k]
    if renormalize:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    if scaling_factor != 1.0:
        topk_weights = topk_weights * scaling_factor
    return topk_weights, topk_ids


class Router(nn.Module):
    """Linear gate [E, H] + select_experts with the config's scoring, grouping and scaling."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.top_k, self.scoring = c.num_experts_per_tok, c.router
        self.n_group, self.topk_group = c.n_group, c.topk_group
        self.renormalize, self.scaling_factor = c.norm_topk_prob, c.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(c.num_experts, c.hidden_size))
        # A checkpoint tensor (a buffer in transformers), so a parameter here for the loader to fill.
        self.e_score_correction_bias = (
            nn.Parameter(torch.zeros(c.num_experts), requires_grad=False)
            if c.router == "sigmoid" or c.router_bias else None
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H] -> (topk_weights [T, k] fp32, topk_ids [T, k])."""
        # fp32 logits: near-tied experts are chosen alike whatever the activation dtype.
        logits = F.linear(x.float(), self.weight.float())  # [T, E]
        return select_experts(logits, self.top_k, self.scoring, self.e_score_correction_bias,
                              self.n_group, self.topk_group, self.renormalize, self.scaling_factor)


class Experts(nn.Module):
    """num_experts gated MLPs stacked: w13 [E, 2I, H] (gate rows, then up rows) and w2 [E, H, I].

    Loading: the model's name maps turn a checkpoint tensor into a shard name, "{e}.gate",
    "{e}.up", "{e}.down" for one expert's [I, H] / [H, I] tensor (Hugging Face) or "gate", "up",
    "gate_up", "down" for all experts stacked (GGUF); each weight loader returns the shards it filled.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, hidden_act: str = "silu") -> None:
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.activation = _ACTIVATIONS[hidden_act]
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        # Placement (parallel/): slot j of the stacks holds logical expert slot_experts[j] (expert
        # parallel: a share of the experts, hot ones maybe twice over the ranks), each cut to rows
        # tp_rank of tp_size of its gate/up (columns of its down).
        self.slot_experts = list(range(num_experts))
        self.tp_rank, self.tp_size = 0, 1
        self.dispatch: ExpertDispatch | None = None  # expert parallel: tokens go to their experts' ranks
        self.reduce_group: dist.ProcessGroup | None = None  # where partial outputs are summed
        self.tp_group: dist.ProcessGroup | None = None  # the ranks holding the other parts of these experts
        # Tensor parallel, quantised: rounds a whole down projection onto its format's grid before
        # this rank takes its columns (parallel/tensor_parallel.parallelize).
        self.grid: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._name_shards()
        # Router statistics: (token, expert) pairs this layer has run per expert since the last reset,
        # warm-up and CUDA-graph padding rows included. Read it, then reset_stats().
        self.tokens_per_expert: torch.Tensor
        self.register_buffer("tokens_per_expert", torch.zeros(num_experts, dtype=torch.long), persistent=False)
        self.window_tokens: torch.Tensor  # the same since the last expert-parallel rebalance
        self.register_buffer("window_tokens", torch.zeros(num_experts, dtype=torch.long), persistent=False)
        self.count_mask: torch.Tensor | None = None  # [>= T] 1 for real rows, set around CUDA-graph steps (padding)
        # Quantised experts. On the GPU the experts stay stacked: int8 (weight-only) in the Triton fused
        # MoE with per-channel scales, w4a8 and w8a8 (fp8) in its 8-bit-activation twin (quant_moe). On
        # the CPU every format packs each expert's matrices with the dense linears' kernels and runs the
        # experts that received tokens one after another.
        self.w13_scale: torch.Tensor | None = None  # [E, 2I] fp32, int8 experts only
        self.w2_scale: torch.Tensor | None = None  # [E, H]
        self.expert_kernels: list[tuple[WeightFormat, Any, Any]] = []
        self.quant13: QuantWeights | None = None  # GPU w4a8 / w8a8 stacks
        self.quant2: QuantWeights | None = None

    @property
    def num_local_experts(self) -> int:
        return len(self.slot_experts)

    def _name_shards(self) -> None:
        experts = sorted(set(self.slot_experts))
        for param, parts in ((self.w13, ("gate", "up")), (self.w2, ("down",))):
            param.weight_loader = self._load  # type: ignore[attr-defined]
            param.leaves_shard = self._leaves  # type: ignore[attr-defined]
            param.shard_names = [f"{e}.{p}" for e in experts for p in parts]  # type: ignore[attr-defined]

    def place(self, slot_experts: list[int], tp_rank: int, tp_size: int) -> None:
        """Before loading: hold only the experts of `slot_experts`, one per slot (expert parallel), each
        already built tp_size times narrower (tensor parallel), rank tp_rank's part of it."""
        self.slot_experts = list(slot_experts)
        self.tp_rank, self.tp_size = tp_rank, tp_size
        shape13, shape2 = self.w13.shape[1:], self.w2.shape[1:]
        self.w13 = nn.Parameter(self.w13.new_empty(len(slot_experts), *shape13))
        self.w2 = nn.Parameter(self.w2.new_empty(len(slot_experts), *shape2))
        self._name_shards()

    def swap_stacks(self, w13: torch.Tensor, w2: torch.Tensor, slot_experts: list[int]) -> None:
        """Hold new expert stacks (an expert-parallel rebalance moved weights between ranks)."""
        self.w13.data, self.w2.data = w13, w2
        self.slot_experts = list(slot_experts)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """x: [T, H]; topk_*: [T, k] -> [T, H]: sum_j topk_weights[:, j] * expert_{topk_ids[:, j]}(x)."""
        if self.dispatch is not None:
            out = self.dispatch.run(self, x, topk_weights, topk_ids)
        else:
            self.count(topk_ids)
            out = self.compute(x, topk_weights, topk_ids)
        if self.reduce_group is not None:
            dist.all_reduce(out, group=self.reduce_group)
        return out

    def count(self, topk_ids: torch.Tensor) -> None:
        flat = topk_ids.reshape(-1)
        # scatter_add_, not bincount: no host sync, so decode steps stay CUDA-graph capturable.
        counted = (torch.ones_like(flat, dtype=torch.long) if self.count_mask is None
                   else self.count_mask[: topk_ids.shape[0]].repeat_interleave(topk_ids.shape[1]))
        self.tokens_per_expert.scatter_add_(0, flat, counted)
        self.window_tokens.scatter_add_(0, flat, counted)

    def compute(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """The experts this module holds, on ids local to it ([0, num_local_experts))."""
        if x.shape[0] == 0:
            return torch.zeros_like(x)
        if self.quant13 is not None and self.quant2 is not None:
            return fused_moe_q8(x, self.quant13, self.quant2, topk_weights, topk_ids, self.activation)
        if self.expert_kernels:
            return self._run_packed(x, topk_weights, topk_ids)
        run = fused_moe if use_fused(x) else fused_moe_cpu
        return run(x, self.w13, self.w2, topk_weights, topk_ids, self.activation,
                   w13_scale=self.w13_scale, w2_scale=self.w2_scale)

    def repack(self, fmt: WeightFormat) -> None:
        """Convert the loaded float experts to `fmt`; the float stacks are dropped."""
        if fmt.name == "dense":
            return
        w13, w2 = self.w13.data, self.w2.data
        if fmt.name == "int8" and w13.is_cuda:  # stacked int8 codes for the Triton kernel
            q13, s13 = int8_per_channel(w13.reshape(-1, w13.shape[-1]))
            q2, s2 = int8_per_channel(w2.reshape(-1, w2.shape[-1]))
            self.w13 = nn.Parameter(q13.view(w13.shape), requires_grad=False)
            self.w2 = nn.Parameter(q2.view(w2.shape), requires_grad=False)
            self.w13_scale, self.w2_scale = s13.view(w13.shape[:2]), s2.view(w2.shape[:2])
            return
        if isinstance(fmt, GpuQ8):  # the linears' GPU packing, on the stacks
            (self.quant13, _), (self.quant2, _) = fmt.pack(w13, None), fmt.pack(w2, None)
            del self.w13, self.w2
            self.w13 = self.w2 = None  # type: ignore[assignment]
            return
        self.expert_kernels = [(fmt, fmt.pack(w13[e], None), fmt.pack(w2[e], None)) for e in range(len(w13))]
        if self.tp_group is not None:  # the down projections read a slice of each row
            share_token_scales([(float("inf"), fmt, k2) for fmt, _, k2 in self.expert_kernels], self.tp_group)
        del self.w13, self.w2
        self.w13 = self.w2 = None  # type: ignore[assignment]

    def _run_packed(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        num_tokens, top_k = topk_ids.shape
        flat = topk_ids.reshape(-1)
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
        counts = torch.bincount(flat, minlength=len(self.expert_kernels)).tolist()
        out = torch.zeros(num_tokens, x.shape[-1], dtype=torch.float32, device=x.device)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            pairs = order[start : start + n]
            start += n
            tokens = pairs // top_k
            fmt, k13, k2 = self.expert_kernels[e]
            gate_up = fmt.apply(x[tokens], k13)  # [n, 2I]
            gate, up = gate_up.float().chunk(2, dim=-1)
            act = F.silu(gate) if self.activation == "silu" else F.gelu(gate, approximate="tanh")
            down = fmt.apply((act * up).to(x.dtype), k2).float()  # [n, H]
            out.index_add_(0, tokens, down * topk_weights.reshape(-1)[pairs, None].float())
        return out.to(x.dtype)

    def reset_stats(self) -> None:
        self.tokens_per_expert.zero_()
        self.window_tokens.zero_()

    def _rows(self, part: str) -> slice:
        inter = self.intermediate_size
        return {"gate": slice(0, inter), "up": slice(inter, 2 * inter), "gate_up": slice(0, 2 * inter),
                "down": slice(None)}[part]

    def read_shard(self, param: torch.Tensor, shard: str) -> torch.Tensor:
        """The inverse of the weight loader for one expert's part "{e}.gate|up|down", or all experts'
        (".gate": a stacked GGUF tensor), for export (an unsharded model)."""
        expert_str, _, part = shard.rpartition(".")
        return (param[int(expert_str)] if expert_str else param)[..., self._rows(part), :]

    def _leaves(self, shard: str | None) -> bool:
        """Whether `shard` ("{e}.part") is an expert this module does not hold (another rank's)."""
        expert_str = (shard or "").rpartition(".")[0]
        return bool(expert_str) and int(expert_str) not in self.slot_experts

    def _load(self, param: torch.Tensor, loaded: torch.Tensor, shard: str) -> list[str]:
        expert_str, _, part = shard.rpartition(".")
        if expert_str:
            expert = int(expert_str)
            if expert >= self.num_experts:
                raise ValueError(f"expert shard {shard}: the model has {self.num_experts} experts")
            slots = [j for j, e in enumerate(self.slot_experts) if e == expert]
            if not slots:
                return []  # another expert-parallel rank's expert
            experts, loaded = [expert], loaded[None].expand(len(slots), *loaded.shape)
        else:  # all experts stacked: each slot takes its own
            slots, experts = list(range(self.num_local_experts)), sorted(set(self.slot_experts))
            loaded = loaded[self.slot_experts]
        loaded = self._tp_slice(loaded, part)
        rows = self._rows(part)
        expected = (len(slots), *param.data[0, rows].shape)
        if expected != tuple(loaded.shape):
            raise ValueError(f"expert shard {shard}: expected shape {expected}, got {tuple(loaded.shape)}")
        for j, slot in enumerate(slots):
            param.data[slot, rows].copy_(loaded[j])
        parts = ("gate", "up") if part == "gate_up" else (part,)
        return [f"{e}.{p}" for e in experts for p in parts]

    def _tp_slice(self, loaded: torch.Tensor, part: str) -> torch.Tensor:
        """[n, rows, cols] whole experts -> this tensor-parallel rank's rows (gate/up) or columns (down)."""
        if self.tp_size == 1:
            return loaded
        inter = self.intermediate_size
        if part == "down":
            if self.grid is not None:
                loaded = self.grid(loaded.reshape(-1, loaded.shape[-1])).reshape(loaded.shape)
            return loaded[..., self.tp_rank * inter : (self.tp_rank + 1) * inter]
        halves = loaded.chunk(2, dim=-2) if part == "gate_up" else (loaded,)
        return torch.cat([h[..., self.tp_rank * inter : (self.tp_rank + 1) * inter, :] for h in halves], dim=-2)


class SparseMoeBlock(nn.Module):
    """The FFN of a MoE layer: routed experts, plus the shared experts every token runs.

    Shared experts are plain MLPs made by `make_mlp(config, intermediate_size)` (the model's dense
    MLP class): qwen2-moe's `shared_expert`, scaled by sigmoid(shared_expert_gate(x)), or
    deepseek's `shared_experts`; their Hugging Face names differ, so both are kept.
    """

    def __init__(self, config: ModelConfig, make_mlp: Callable[[ModelConfig, int], nn.Module]) -> None:
        super().__init__()
        c = config
        self.gate = Router(c)
        self.experts = Experts(c.num_experts, c.hidden_size, c.moe_intermediate_size, c.hidden_act)
        self.shared_expert = (
            make_mlp(c, c.shared_expert_intermediate_size) if c.shared_expert_intermediate_size else None
        )
        # nn.Linear, not layers.linear.Linear: a [1, H] gate is not worth repacking into a weight format.
        self.shared_expert_gate = nn.Linear(c.hidden_size, 1, bias=False) if c.shared_expert_gate else None
        self.shared_experts = make_mlp(c, c.moe_intermediate_size * c.n_shared_experts) if c.n_shared_experts else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] -> [T, H]."""
        topk_weights, topk_ids = self.gate(x)
        out = self.experts(x, topk_weights, topk_ids)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out

