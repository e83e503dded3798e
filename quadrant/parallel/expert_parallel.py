"""Expert parallelism: tokens travel to the ranks that hold their experts and back.

Every rank of an expert-parallel group holds the same tokens (attention runs before the experts,
replicated or tensor-parallel); each routes its own contiguous share of them, sends every
(token, expert) pair to a rank holding a copy of the expert (parallel/eplb.py places them) with
one `all_to_all_single` of variable splits, runs
the pairs it received through its local experts, and returns the weighted results the same way.
The caller's all-reduce (Experts.reduce_group) then gives every rank every token's sum. This is the
reference path, on gloo as on NCCL; a DeepEP-style kernel would replace `run`, not its callers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from quadrant.parallel.eplb import replica_table

if TYPE_CHECKING:
    from quadrant.layers.moe import Experts


class ExpertDispatch:
    """One MoE layer's view of the expert-parallel group: which rank holds which experts."""

    def __init__(self, rank: int, size: int, slots_per_rank: int, group: dist.ProcessGroup,
                 group_ranks: list[int], placement: list[int], num_experts: int) -> None:
        self.rank, self.size, self.slots_per_rank = rank, size, slots_per_rank
        self.group, self.group_ranks = group, group_ranks  # global rank of each member of the group
        self.num_experts = num_experts
        self.set_placement(placement)

    def set_placement(self, placement: list[int]) -> None:
        """placement[slot]: the logical expert of each global slot (rank = slot // slots_per_rank)."""
        self.placement = list(placement)
        self.copy_slots, self.num_copies = replica_table(placement, self.num_experts)  # [E, C], [E]

    def run(self, experts: "Experts", x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
            ) -> torch.Tensor:
        """x: [T, H], topk_*: [T, k] (the same on every rank) -> [T, H]: this rank's tokens' results, zero
        elsewhere (the caller sums over the group)."""
        num_tokens, top_k = topk_ids.shape
        lo, hi = num_tokens * self.rank // self.size, num_tokens * (self.rank + 1) // self.size
        experts.count(topk_ids[lo:hi])
        if self.copy_slots.device != x.device:
            self.copy_slots, self.num_copies = self.copy_slots.to(x.device), self.num_copies.to(x.device)
        # Each (token, expert) pair goes to one copy of its expert, the copies taking turns by token.
        chosen = topk_ids[lo:hi]  # [n, k]
        token_index = torch.arange(lo, hi, device=x.device)[:, None]
        ids = self.copy_slots[chosen, token_index % self.num_copies[chosen]].reshape(-1)  # [P] global slots
        owner = torch.div(ids, self.slots_per_rank, rounding_mode="floor")
        order = torch.argsort(owner, stable=True)  # pairs grouped by destination rank
        send_counts = torch.bincount(owner, minlength=self.size)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        token = lo + torch.div(order, top_k, rounding_mode="floor")  # [P] row of x of each sent pair
        # Local expert id and routing weight travel together (ids are exact in fp32).
        meta = torch.stack([(ids % self.slots_per_rank)[order].float(),
                            topk_weights[lo:hi].reshape(-1)[order].float()], dim=1)  # [P, 2]
        recv_x = x.new_empty(sum(recv), x.shape[1])
        dist.all_to_all_single(recv_x, x[token].contiguous(), recv, send, group=self.group)
        recv_meta = meta.new_empty(sum(recv), 2)
        dist.all_to_all_single(recv_meta, meta, recv, send, group=self.group)
        y = experts.compute(recv_x, recv_meta[:, 1:], recv_meta[:, :1].long())  # [M, H], weighted
        back = y.new_empty(len(order), x.shape[1])
        dist.all_to_all_single(back, y.contiguous(), send, recv, group=self.group)
        out = torch.zeros_like(x)
        out.index_add_(0, token, back)
        return out
