"""The step contract between the driver (scheduler) and the workers (model, KV cache, sampler).

A StepInput is plain, picklable data: what the workers must learn about the requests of this step
(new ones whole, known ones as deltas: tokens sampled since, blocks added since) and how many
tokens of each to run. Workers keep their own mirror of every request they have seen
(`WorkerRequests`), so a decode step sends a few integers per request, never a live Request.
`StepEncoder` is the driver's half: it remembers what the workers already know.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from quadrant.engine.request import Request
from quadrant.engine.scheduler import SchedulerOutput
from quadrant.layers.sampler import TokenLogprob
from quadrant.sampling_params import SamplingParams


PLACEHOLDER = -1  # an output token sampled by a step still in flight (overlapped scheduling)


@dataclass
class NewRequest:
    """A request the workers have not seen: everything they will keep of it."""

    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]  # tokens already generated (empty unless resent)
    params: SamplingParams
    seed: int | None  # this sample's seed (params.seed + its index); None: the worker's own generator
    block_ids: list[int]


@dataclass
class CachedRequest:
    """A request the workers know: what changed since they last saw it."""

    request_id: str
    new_token_ids: list[int]  # sampled since the last step that ran it (PLACEHOLDER: by the step before this)
    new_block_ids: list[int]  # appended to its block table
    reset_blocks: bool = False  # preempted since: the block table restarts from new_block_ids


@dataclass
class ScheduledRow:
    request_id: str
    num_computed_tokens: int  # tokens already in the KV cache; this step runs the next num_new_tokens
    num_new_tokens: int  # speculative drafts included: they run after the request's last token
    # Speculative decoding: tokens to verify after the last one, and (draft model) the [k, V]
    # distributions they were drawn from; None: each draft was certain (n-gram), or greedy.
    draft_token_ids: list[int] = field(default_factory=list)
    draft_probs: torch.Tensor | None = None
    draft_parents: list[int] | None = None  # the drafts form a token tree (engine/spec/tree.py); None: a chain


@dataclass
class StepInput:
    new_requests: list[NewRequest] = field(default_factory=list)
    cached_requests: list[CachedRequest] = field(default_factory=list)
    rows: list[ScheduledRow] = field(default_factory=list)  # in batch order
    finished_request_ids: list[str] = field(default_factory=list)  # finished or aborted: forget them
    # Structured outputs: request id -> the allowed tokens at its last token and after each of its
    # drafts, int32 bitmasks [k + 1, ceil(V / 32)] (engine/structured.py); rows without one are free.
    token_masks: dict[str, torch.Tensor] = field(default_factory=dict)
    # KV cache slots to copy (from, to) in every layer before the step runs: verified token trees' accepted
    # nodes moved to a chain's slots (Scheduler.update).
    kv_moves: list[tuple[int, int]] = field(default_factory=list)


# request id -> (the tokens this step added, in order: one, or with speculation the accepted drafts and
# one more; empty when sampling failed), (their logprob records when asked for, else empty)).
Sampled = dict[str, tuple[list[int], list[TokenLogprob]]]


# request id -> (index of the first prompt token these records score, the records): prompt logprobs
# of the prompt tokens this step's chunk predicts (a token's record comes from the logits before it).
PromptLogprobs = dict[str, tuple[int, list[TokenLogprob]]]


# request id -> (the first prompt position this chunk pooled, how many, their pooled hidden state [D] fp32 on the
# CPU: a sum for mean pooling, the last position's for last pooling).
Pooled = dict[str, tuple[int, int, torch.Tensor]]


# request id -> (the position of the row's first token this step, the final hidden states [n, D] of its n tokens):
# what an EAGLE draft head reads (engine/spec/eagle.py). Rows past a rejected draft are stale.
Hidden = dict[str, tuple[int, torch.Tensor]]


@dataclass
class StepOutput:
    # The rows that reached their last token (drafts included). Only the driver worker (rank 0) fills it.
    sampled: Sampled = field(default_factory=dict)
    prompt_logprobs: PromptLogprobs = field(default_factory=dict)
    pooled: Pooled = field(default_factory=dict)
    hidden: Hidden = field(default_factory=dict)  # only where the runner keeps hidden states (EAGLE)


@dataclass
class _Sent:
    request: Request
    num_output_ids: int  # output tokens the workers have
    num_block_ids: int  # block-table entries the workers have
    num_preemptions: int


class StepEncoder:
    """Driver side: SchedulerOutput -> StepInput, sending each fact to the workers once."""

    def __init__(self) -> None:
        self._sent: dict[str, _Sent] = {}

    def encode(self, out: SchedulerOutput) -> StepInput:
        step = StepInput(finished_request_ids=self._forget_finished(), kv_moves=out.kv_moves)
        for s in out.scheduled:
            req = s.request
            known = self._sent.get(req.request_id)
            # Tokens a step in flight will sample go as placeholders: the workers fill them in from their
            # own sampling (WorkerRequests.apply), and never get them again once known here.
            output_ids = req.output_ids + [PLACEHOLDER] * req.num_output_placeholders
            if known is None:
                step.new_requests.append(NewRequest(req.request_id, req.prompt_ids, output_ids, req.params,
                                                    req.seed, list(req.block_table)))
            else:
                reset = known.num_preemptions != req.num_preemptions
                step.cached_requests.append(CachedRequest(
                    req.request_id, output_ids[known.num_output_ids:],
                    req.block_table[0 if reset else known.num_block_ids:], reset))
            self._sent[req.request_id] = _Sent(req, len(output_ids), len(req.block_table), req.num_preemptions)
            step.rows.append(ScheduledRow(req.request_id, req.num_computed_tokens, s.num_new_tokens,
                                          s.draft_token_ids, s.draft_probs, s.draft_parents))
        return step

    def _forget_finished(self) -> list[str]:
        done = [rid for rid, sent in self._sent.items() if sent.request.is_finished]
        for rid in done:
            del self._sent[rid]
        return done


@dataclass
class WorkerRequest:
    """A worker's mirror of one request: what running and sampling it reads (layers.sampler.SamplingState)."""

    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    block_table: list[int]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        """(prompt_ids + output_ids)[start:end] without concatenating the whole sequence."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.output_ids[start - n : end - n]
        return self.prompt_ids[start:] + self.output_ids[: end - n]


class WorkerRequests:
    """Worker side: the mirror of every live request, advanced by each StepInput."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.requests: dict[str, WorkerRequest] = {}
        # Each request's tokens from the last step that sampled it: what its placeholders stand for.
        self.last_sampled: dict[str, list[int]] = {}

    def apply(self, step: StepInput) -> list[tuple[WorkerRequest, ScheduledRow]]:
        """Take in the step's news; returns the batch's (request, row) pairs in order."""
        for rid in step.finished_request_ids:
            self.requests.pop(rid, None)
            self.last_sampled.pop(rid, None)
        for new in step.new_requests:
            gen = None if new.seed is None else torch.Generator(device=self.device).manual_seed(new.seed)
            self.requests[new.request_id] = WorkerRequest(new.request_id, new.prompt_ids,
                                                          self._filled(new.request_id, new.output_ids),
                                                          new.params, gen, list(new.block_ids))
        for cached in step.cached_requests:
            req = self.requests[cached.request_id]
            req.output_ids.extend(self._filled(cached.request_id, cached.new_token_ids))
            if cached.reset_blocks:
                req.block_table = list(cached.new_block_ids)
            else:
                req.block_table.extend(cached.new_block_ids)
        return [(self.requests[row.request_id], row) for row in step.rows]

    def _filled(self, request_id: str, token_ids: list[int]) -> list[int]:
        """The tokens with their trailing placeholders replaced by what the previous step sampled."""
        n = 0
        while n < len(token_ids) and token_ids[len(token_ids) - 1 - n] == PLACEHOLDER:
            n += 1
        if not n:
            return list(token_ids)
        # A failed sample (no token) stands in as 0: the driver fails that request and drops this row's result.
        sampled = ([0] * n + self.last_sampled.get(request_id, []))[-n:]
        return token_ids[: len(token_ids) - n] + sampled

    def record(self, sampled: Sampled) -> None:
        """Keep this step's sampled tokens for the placeholders of the next."""
        for rid, (tokens, _) in sampled.items():
            self.last_sampled[rid] = tokens
