"""The scheduler: which requests run in the next step, and how many tokens each.

Running requests go first (decodes, and the next chunk of unfinished
prefills), then waiting ones, within a token budget; every request that fits
goes into one flattened batch. When the KV pool runs dry the newest running
request is preempted: its blocks are freed and it waits to recompute. Pure
Python: the runner turns the SchedulerOutput into tensors.

With a KV connector (quadrant/disagg/), a decode engine's request that names a remote prompt KV
gets its blocks on admission and waits, outside the batch, while they are pulled; it then runs
from the prefill engine's first token (or, without one, from its last prompt token). A prefill
engine hands a finished prompt's blocks to the connector's lease instead of freeing them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from quadrant.config import SchedulerConfig
from quadrant.engine.kv_cache import KVCacheManager
from quadrant.engine.request import FinishReason, Request, RequestStatus
from quadrant.engine.spec.tree import accepted_path, path_moves
from quadrant.layers.sampler import TokenLogprob

if TYPE_CHECKING:
    from quadrant.disagg.connector import KVConnector


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens run this step, from request.num_computed_tokens on (drafts included)
    draft_token_ids: list[int] = field(default_factory=list)  # speculative tokens verified this step
    draft_probs: Any = None  # their draft distributions [k, V] (draft model, sampled requests)
    draft_parents: list[int] | None = None  # the drafts form a token tree (engine/spec/tree.py); None: a chain
    samples: bool = False  # the step reaches the request's last token and samples (set by Scheduler.commit)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)  # in batch order
    num_batched_tokens: int = 0
    preempted: list[str] = field(default_factory=list)  # request ids preempted this step
    # KV cache slots to copy (from, to) before the step runs: the accepted path of a token tree moved to
    # where a chain would have put it (the previous step verified it).
    kv_moves: list[tuple[int, int]] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, connector: KVConnector | None = None,
                 recompute_failed_loads: bool = True) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.connector = connector
        self.recompute_failed_loads = recompute_failed_loads  # else a failed pull fails its request
        self.loading: dict[str, Request] = {}  # decode side: prompts whose KV is being pulled
        self.failed_loads: list[tuple[Request, str]] = []  # for the engine to fail (taken by take_remote_news)
        # Pulled requests that came with the prefill engine's first token: for the engine to emit.
        self.arrived: list[tuple[Request, TokenLogprob | None]] = []
        self.kv_moves: list[tuple[int, int]] = []  # for the next step that runs (SchedulerOutput.kv_moves)

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def schedule(self) -> SchedulerOutput:
        self.drain_connector()
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        # 1. Running requests, oldest first; preempt from the newest end when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if self._finishes_in_flight(req):
                i += 1  # the step in flight gives it its last token: nothing more to run
                continue
            base = req.num_tokens + req.num_output_placeholders - req.num_computed_tokens
            drafts, req.draft_token_ids = req.draft_token_ids, []  # proposed for this step only
            probs, req.draft_probs = req.draft_probs, None
            parents, req.draft_parents = req.draft_parents, None
            num_new = min(base + len(drafts), budget)
            while not self.kv.allocate(req, num_new):
                if num_new > base:  # short of blocks: verify no drafts rather than preempt anyone
                    num_new = min(base, budget)
                    continue
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                kept = max(0, num_new - base)  # a tight budget verifies fewer drafts
                # A tree's nodes come parents first, so a cut tree is still a tree.
                out.scheduled.append(ScheduledRequest(req, num_new, drafts[:kept],
                                                      probs[:kept] if kept and probs is not None else None,
                                                      parents[:kept] if kept and parents is not None else None))
                budget -= num_new
                i += 1
                continue
            break
        # 2. Waiting requests, unless this step already had to preempt.
        if not out.preempted:
            self._admit_waiting(out, budget)
        out.num_batched_tokens = sum(s.num_new_tokens for s in out.scheduled)
        if out.scheduled:
            out.kv_moves, self.kv_moves = self.kv_moves, []
        return out

    @staticmethod
    def _finishes_in_flight(req: Request) -> bool:
        """Overlapped scheduling: the in-flight step samples the request's max_tokens-th token."""
        return req.num_output_placeholders > 0 and req.params.max_tokens is not None \
            and len(req.output_ids) + req.num_output_placeholders >= max(req.params.max_tokens, 1)

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        prefilling_groups = {r.group_id for r in [*self.running, *self.loading.values()]
                             if r.group_id is not None and r.is_prefilling}
        skipped: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) + len(self.loading) < self.config.max_num_seqs:
            req = self.waiting[0]
            if req.group_id in prefilling_groups:
                # A sibling is computing (or pulling) the shared prompt: wait and reuse its blocks.
                skipped.append(self.waiting.popleft())
                continue
            if req.remote_kv is not None:
                if not self._start_load(req):
                    break
                if req.group_id is not None:
                    prefilling_groups.add(req.group_id)
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

    def _start_load(self, req: Request) -> bool:
        """Blocks for the whole prompt (local prefix hits kept), then pull the rest; False if the pool is short."""
        assert self.connector is not None and req.remote_kv is not None
        hits = self.kv.find_cached_prefix(req)
        if not self.kv.allocate(req, req.num_prompt_tokens - len(hits) * self.kv.block_size, hits):
            return False
        self.waiting.popleft()
        remote, req.remote_kv = req.remote_kv, None  # pulled once; a later preemption recomputes
        req.num_cached_prompt_tokens = len(hits) * self.kv.block_size
        req.status = RequestStatus.WAITING_FOR_REMOTE_KV
        self.loading[req.request_id] = req
        # Decoding goes on from the prefill engine's first token, unless logprobs are asked for and it came
        # without its record (the last prompt token then runs here again).
        if remote.first_token is not None and (req.params.logprobs is None or remote.first_logprob is not None):
            req.output_ids.append(remote.first_token)
            self.arrived.append((req, remote.first_logprob))
        n = len(req.block_table)
        remote_ids = None if remote.block_ids is None else list(remote.block_ids[len(hits):n])
        self.connector.start_load(req, remote, req.block_table[len(hits):], remote_ids, len(hits))
        return True

    def drain_connector(self) -> None:
        """Free the blocks of released or expired leases (prefill); run the requests whose pull ended (decode)."""
        if self.connector is None:
            return
        for req in self.connector.take_released():
            self.kv.free(req)
        for req, error, first in self.connector.take_finished_loads():
            if self.loading.get(req.request_id) is req:  # (the id may have been reused since an abort)
                del self.loading[req.request_id]
            if req.is_finished:  # aborted while the pull was writing into its blocks: free them only now
                self.kv.free(req)
                continue
            # An overlapped pull learns the first token at its end (and without it runs the last prompt token).
            if error is None and first is not None and not req.output_ids and \
                    (req.params.logprobs is None or first[1] is not None):
                req.output_ids.append(first[0])
                self.arrived.append((req, first[1]))
            if error is None:
                # With the first token known, it runs next; without, the last prompt token runs for its logits.
                req.num_computed_tokens = req.num_prompt_tokens - (0 if req.output_ids else 1)
            elif self.recompute_failed_loads:
                req.num_computed_tokens = req.num_cached_prompt_tokens  # keep local hits, recompute the rest
            else:
                self.failed_loads.append((req, error))
                continue
            self.kv.cache_full_blocks(req)
            req.status = RequestStatus.RUNNING
            self.running.append(req)

    def take_remote_news(self) -> tuple[list[tuple[Request, TokenLogprob | None]], list[tuple[Request, str]]]:
        """First tokens that came with pulled prompts (to emit), and failed pulls (to fail), since the last call."""
        arrived, self.arrived = self.arrived, []
        failed, self.failed_loads = self.failed_loads, []
        return arrived, failed

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        req.draft_token_ids, req.draft_probs, req.draft_parents = [], None, None
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def commit(self, out: SchedulerOutput) -> None:
        """The step was handed to the workers: its tokens count as computed now, and each row that
        samples holds a placeholder for its token until update() brings it. With overlapped scheduling
        the next step is scheduled in between, as if those tokens were known."""
        for s in out.scheduled:
            req = s.request
            s.samples = req.num_computed_tokens + s.num_new_tokens >= \
                req.num_tokens + req.num_output_placeholders + len(s.draft_token_ids)
            req.num_computed_tokens += s.num_new_tokens
            req.num_output_placeholders += s.samples
            if not s.draft_token_ids:  # (a verified row's drafts may yet be rejected)
                self.kv.cache_full_blocks(req)  # a sibling or a repeated prompt scheduled next reuses them

    def update(self, out: SchedulerOutput, sampled: dict[str, list[int]]) -> None:
        """A committed step's results: its tokens replace the placeholders, full blocks are cached.
        Whether a request is done is output processing's decision (engine/output.py), which then calls
        finish(); a request finished (or aborted) while its step ran takes nothing.

        A verified row computed its drafts' K/V too; the rejected ones' stay in slots past
        num_computed_tokens, unhashed, and the next step overwrites them (that is the rollback). A tree's
        accepted nodes are moved into a chain's slots by the next step that runs (kv_moves), before any
        step can read them."""
        for s in out.scheduled:
            req = s.request
            if s.samples:
                req.num_output_placeholders -= 1
            if req.is_finished:
                continue
            tokens = sampled.get(req.request_id, [])
            if s.draft_token_ids and req.status == RequestStatus.RUNNING:
                # k drafts verified: all but the last of the returned tokens were drafts accepted.
                req.num_computed_tokens -= len(s.draft_token_ids) - max(len(tokens) - 1, 0)
                if s.draft_parents is not None and len(tokens) > 1:
                    self._move_tree_path(req, s, tokens[:-1])
            req.output_ids.extend(tokens)
            self.kv.cache_full_blocks(req)

    def _move_tree_path(self, req: Request, s: ScheduledRequest, accepted: list[int]) -> None:
        """Queue the copies that put a verified tree's accepted nodes where a chain's would be."""
        assert s.draft_parents is not None
        path = accepted_path(s.draft_parents, s.draft_token_ids, accepted)
        first = req.num_computed_tokens - len(accepted)  # index of the first draft node
        bs, table = self.kv.block_size, req.block_table
        slot = lambda i: table[(first + i) // bs] * bs + (first + i) % bs  # noqa: E731
        self.kv_moves += [(slot(src), slot(dst)) for src, dst in path_moves(path)]

    def finish(self, req: Request, reason: FinishReason) -> None:
        """End a request (stopped, at length, or aborted) and release its blocks at once."""
        if req.is_finished:
            return
        req.status, status = RequestStatus.FINISHED, req.status
        req.finish_reason = reason
        if status == RequestStatus.WAITING_FOR_REMOTE_KV:
            if self.loading.get(req.request_id) is req:
                del self.loading[req.request_id]
                return  # a pull may be writing into its blocks: drain_connector frees them when it ends
        elif status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        prefill = self.connector is not None and self.connector.server is not None
        if req.do_remote_decode and reason != FinishReason.ABORT and prefill:
            assert self.connector is not None
            req.kv_transfer_params = self.connector.hold(req).to_dict()
            if self.connector.holds_blocks:
                return  # its blocks wait for the decode side
        elif req.kv_transfer_id is not None and prefill:
            assert self.connector is not None
            if self.connector.cancel(req):
                return  # a pull is reading them: the lease frees them when it ends
        self.kv.free(req)
