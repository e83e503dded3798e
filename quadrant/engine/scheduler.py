"""The scheduler: which requests run in the next step, and how many tokens each.

Running requests go first (decodes, and the next chunk of unfinished
prefills), then waiting ones, within a token budget; every request that fits
goes into one flattened batch. When the KV pool runs dry the newest running
request is preempted: its blocks are freed and it waits to recompute. Pure
Python: the runner turns the SchedulerOutput into tensors.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from quadrant.config import SchedulerConfig
from quadrant.engine.kv_cache import KVCacheManager
from quadrant.engine.request import FinishReason, Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens run this step, from request.num_computed_tokens on


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)  # in batch order
    num_batched_tokens: int = 0
    preempted: list[str] = field(default_factory=list)  # request ids preempted this step

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        # 1. Running requests, oldest first; preempt from the newest end when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate(req, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                out.scheduled.append(ScheduledRequest(req, num_new))
                budget -= num_new
                i += 1
                continue
            break
        # 2. Waiting requests, unless this step already had to preempt.
        if not out.preempted:
            self._admit_waiting(out, budget)
        out.num_batched_tokens = sum(s.num_new_tokens for s in out.scheduled)
        return out

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        prefilling_groups = {r.group_id for r in self.running if r.group_id is not None and r.is_prefilling}
        skipped: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if req.group_id in prefilling_groups:
                # A sibling is computing the shared prompt: wait one step and reuse its blocks.
                skipped.append(self.waiting.popleft())
                continue
            hits = self.kv.find_cached_prefix(req) if req.num_computed_tokens == 0 else []
            num_new = min(req.num_tokens - req.num_computed_tokens - len(hits) * self.kv.block_size, budget)
            if not self.kv.allocate(req, num_new, hits):
                break
            if req.num_preemptions == 0:
                req.num_cached_prompt_tokens = len(hits) * self.kv.block_size
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, num_new))
            budget -= num_new
            if req.group_id is not None and req.is_prefilling:
                prefilling_groups.add(req.group_id)
        self.waiting.extendleft(reversed(skipped))

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def update(self, out: SchedulerOutput, sampled: dict[str, int | None]) -> None:
        """Advance computed counts, cache full blocks, append sampled tokens. Whether a request is done
        is output processing's decision (engine/output.py), which then calls finish()."""
        for s in out.scheduled:
            req = s.request
            req.num_computed_tokens += s.num_new_tokens
            self.kv.cache_full_blocks(req)
            token = sampled.get(req.request_id)
            if token is not None:
                req.output_ids.append(token)

    def finish(self, req: Request, reason: FinishReason) -> None:
        """End a request (stopped, at length, or aborted) and release its blocks at once."""
        if req.is_finished:
            return
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
