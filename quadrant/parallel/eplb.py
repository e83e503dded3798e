"""Expert-parallel load balancing (DeepSeek's EPLB): redundant copies of hot experts, and a
rebalance that moves expert weights between ranks from the measured load.

A placement lists the logical expert held by every physical slot, rank by rank (`slots_per_rank`
slots each; num_experts + redundant slots in all). `plan_placement` gives the hottest experts
the redundant slots (each new copy to the expert with the most load per copy, at most one copy
per rank), then packs the copies onto ranks heaviest first, each to the least loaded rank with a
free slot that holds no copy of it yet. `move_experts` makes a rank's slots match a new placement: slots it already holds
are copied locally, the rest arrive from a rank that held them, point to point.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def plan_placement(load: Sequence[float], num_ranks: int, slots_per_rank: int) -> list[int]:
    """load [E] (tokens per logical expert) -> slot -> expert for num_ranks * slots_per_rank slots."""
    num_experts, num_slots = len(load), num_ranks * slots_per_rank
    assert num_experts <= num_slots, "every expert needs a slot"
    load = [float(n) + 1.0 for n in load]  # one token of prior each: no load means an even spread
    copies = [1] * num_experts
    for _ in range(num_slots - num_experts):
        # At most one copy per rank: a second copy on the same rank would share its compute.
        eligible = [e for e in range(num_experts) if copies[e] < num_ranks]
        hottest = max(eligible, key=lambda e: (load[e] / copies[e], -e))
        copies[hottest] += 1
    replicas = sorted(((load[e] / copies[e], e) for e in range(num_experts) for _ in range(copies[e])),
                      key=lambda item: (-item[0], item[1]))
    rank_load = [0.0] * num_ranks
    held: list[list[int]] = [[] for _ in range(num_ranks)]
    for share, expert in replicas:
        open_ranks = [r for r in range(num_ranks) if len(held[r]) < slots_per_rank]
        fresh = [r for r in open_ranks if expert not in held[r]] or open_ranks
        rank = min(fresh, key=lambda r: (rank_load[r], r))
        held[rank].append(expert)
        rank_load[rank] += share
    return [e for r in range(num_ranks) for e in sorted(held[r])]


def replica_table(placement: Sequence[int], num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots [E, max copies] int64, the global slot of each copy, -1 padded; copies [E] int64)."""
    slots: list[list[int]] = [[] for _ in range(num_experts)]
    for slot, expert in enumerate(placement):
        slots[expert].append(slot)
    width = max(len(s) for s in slots)
    table = torch.tensor([s + [-1] * (width - len(s)) for s in slots], dtype=torch.long)
    return table, torch.tensor([len(s) for s in slots], dtype=torch.long)


def move_experts(stacks: Sequence[torch.Tensor], old: Sequence[int], new: Sequence[int], rank: int,
                 slots_per_rank: int, group_ranks: Sequence[int]) -> list[torch.Tensor]:
    """This rank's expert stacks ([slots_per_rank, ...] each) under placement `new`, given `old`.
    Every rank of the group calls it with the same placements; `group_ranks[i]` is the global rank
    of the group's i-th member."""
    old = list(old)
    out = [torch.empty_like(s) for s in stacks]
    ops: list[dist.P2POp] = []
    for slot, expert in enumerate(new):
        dest = slot // slots_per_rank
        held = old[dest * slots_per_rank : (dest + 1) * slots_per_rank]  # the destination's old slots
        if expert in held:
            if dest == rank:  # already here: a local copy
                for o, s in zip(out, stacks):
                    o[slot % slots_per_rank].copy_(s[held.index(expert)])
            continue
        src_slot = old.index(expert)
        src = src_slot // slots_per_rank
        if dest == rank:
            ops += [dist.P2POp(dist.irecv, o[slot % slots_per_rank], group_ranks[src], tag=slot * len(out) + i)
                    for i, o in enumerate(out)]
        elif src == rank:
            ops += [dist.P2POp(dist.isend, s[src_slot % slots_per_rank].contiguous(), group_ranks[dest],
                               tag=slot * len(stacks) + i) for i, s in enumerate(stacks)]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    return out
