"""When to speculate, and how many tokens each request drafts.

A step of T tokens costs about 1 + c (T - 1) one-token steps, c being `draft_cost`: on this
project's CPU kernels each extra token adds about a quarter of a decode step (BENCHMARKS.md), on a
GPU a few percent (decode reads the weights once, whatever the row count). A request whose drafts
are accepted with probability a adds a^(k+1) expected tokens with its (k+1)-th draft. Each step,
the drafts go one at a time to the request whose next draft adds the most, while that raises the
step's expected tokens per unit of cost (the goodput-greedy allocation of SmartSpec, Liu et al.
2024): a lone request drafts several tokens, a large batch, already compute-bound, drafts few or
none, and a request with poor acceptance drafts nothing. On CPU a step also stays within
`max_step_tokens` (the batch size up to which the compact-weight kernels run; beyond it the whole
step switches to bf16 GEMMs, several times dearer).

Where decode steps run compiled graphs (CPU, engine/cpu_compiled.py), the engine sets `step_cost`:
a step's time by its token count, from the graphs' measured times. Those padded batch sizes make the
cost a staircase (5 tokens cost what 8 do), so the drafts are ranked greedily as above but the plan
is the prefix of that ranking with the best expected tokens per unit of cost, not the first prefix
whose next draft stops paying.

Drafting has its own cost where the proposer runs a model (a draft model, an EAGLE head): a chain of
k drafts is k proposer forwards, batched across requests. The engine measures it (`observe_drafting`,
seconds per forward over a one-token step's seconds) and a plan pays it for its longest chain,
so a proposer whose forwards cost more than its accepted tokens save stops drafting (n-gram lookup
costs next to nothing). Steps that draft nothing forget a little of that cost, so it is measured again.

Each request keeps decayed counts of accepted drafts and of rejections (a verification that did not
take all its drafts saw one) to estimate a. When even a lone request's drafts cannot pay (a about c or
less, or no chain repaying the eager ratio), it pauses for a number of steps that doubles at every repeat (4, 8, ... 64), then probes again. Above
`max_batch_size` decoding requests no step speculates. Drafts never pass max_tokens or the context.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

from quadrant.config import SpeculativeConfig
from quadrant.engine.request import Request

_FIRST_PAUSE, _LONGEST_PAUSE = 4, 64
_DECAY = 0.8  # weight of the history at each new verification
_PRIOR_ACCEPTED, _PRIOR_REJECTED = 1.0, 1.0  # a new request starts from a = 1/2: batches of 4+ wait for evidence
_CLEAR_GAIN = 1.01  # a draft must raise the step's expected tokens per unit of cost by 1%
_DRAFT_COST_DECAY = 0.8  # weight of the history at each new drafting measurement
# Each step that drafts nothing for want of paying forgets a little of the proposer's cost, so a high
# reading (a busy moment) cannot keep drafting off for good: twice the true cost is measured again
# within ~140 steps.
_FORWARD_COST_FORGET = 0.995


@dataclass
class _RequestState:
    accepted: float = _PRIOR_ACCEPTED
    rejected: float = _PRIOR_REJECTED
    paused_steps: int = 0
    next_pause: int = _FIRST_PAUSE

    @property
    def acceptance(self) -> float:
        """Estimated probability that the next draft is accepted, given the previous one was."""
        return self.accepted / (self.accepted + self.rejected)


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens a verification of k drafts adds on average (the accepted run plus the target's own)."""
    if acceptance >= 1.0:
        return k + 1.0
    return (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)


class SpeculationPolicy:
    def __init__(self, config: SpeculativeConfig, max_model_len: int, draft_cost: float,
                 max_step_tokens: int | None = None) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.draft_cost = draft_cost
        self.max_step_tokens = max_step_tokens
        self.states: dict[str, _RequestState] = {}
        # Tokens of a decode-only step -> its time, where the engine measures it (compiled CPU graphs);
        # None: 1 + draft_cost (tokens - 1) one-token steps.
        self.step_cost: Callable[[int], float] | None = None
        self.forward_cost = 0.0  # one proposer forward, in one-token steps (decayed mean of measurements)

    def observe_drafting(self, seconds: float, forwards: int, step_seconds: float) -> None:
        """A propose call took `seconds` for `forwards` chained forwards; a one-token step takes step_seconds."""
        if forwards < 1 or step_seconds <= 0:
            return
        cost = seconds / forwards / step_seconds
        self.forward_cost = cost if self.forward_cost == 0.0 else \
            _DRAFT_COST_DECAY * self.forward_cost + (1 - _DRAFT_COST_DECAY) * cost

    def cost(self, num_tokens: int) -> float:
        """The time of a decode-only step of num_tokens tokens (drafts included), in one-token steps."""
        if self.step_cost is not None:
            return self.step_cost(num_tokens)
        return 1.0 + self.draft_cost * (num_tokens - 1)

    def plan(self, decoding: list[Request]) -> dict[str, int]:
        """Draft tokens for each decoding request's next step (absent: none)."""
        limits: dict[str, tuple[Request, _RequestState, int]] = {}
        for req in decoding:
            state = self.states.setdefault(req.request_id, _RequestState())
            if state.paused_steps > 0:
                state.paused_steps -= 1
                continue
            # The verifying step adds at most k + 1 tokens: past max_tokens or the context they are wasted.
            left = min(req.params.max_tokens - len(req.output_ids), self.max_model_len - req.num_tokens) - 1
            k = min(self.config.num_speculative_tokens, left)
            if k > 0:
                limits[req.request_id] = (req, state, k)
        rows = len(decoding)
        tokens, expected = rows, float(rows)
        room = self.max_step_tokens - tokens if self.max_step_tokens is not None else len(limits) * 16
        # Max-heap on the expected tokens the next draft adds: a^(k+1) for a request drafting k so far.
        heap = [(-state.acceptance, rid) for rid, (_, state, _) in limits.items()]  # (-gain, id)
        heapq.heapify(heap)
        order: list[str] = []  # drafts, best first
        drafted: dict[str, int] = {}
        plain_rate = rows / self.cost(rows)
        best_rate, best_len = plain_rate * _CLEAR_GAIN, 0  # a plan must beat plain decoding clearly
        longest = 0  # the longest chain drafted so far: the proposer forwards the plan pays
        while heap and room > 0:
            neg_gain, rid = heapq.heappop(heap)
            order.append(rid)
            tokens, expected, room = tokens + 1, expected - neg_gain, room - 1
            drafted[rid] = drafted.get(rid, 0) + 1
            longest = max(longest, drafted[rid])
            rate = expected / (self.cost(tokens) + self.forward_cost * longest)
            if rate > best_rate:
                best_rate, best_len = rate, len(order)
            _, state, limit = limits[rid]
            if drafted[rid] < limit:
                heapq.heappush(heap, (neg_gain * state.acceptance, rid))
        plan: dict[str, int] = {}
        for rid in order[:best_len]:
            plan[rid] = plan.get(rid, 0) + 1
        if not plan and limits:
            self.forward_cost *= _FORWARD_COST_FORGET
        return plan

    def record(self, request_id: str, drafted: int, accepted: int) -> bool:
        """Take a verification's outcome; True when the request now backs off."""
        state = self.states.setdefault(request_id, _RequestState())
        state.accepted = _DECAY * state.accepted + accepted
        state.rejected = _DECAY * state.rejected + (1.0 if accepted < drafted else 0.0)
        if self._pays(state.acceptance):
            if accepted:
                state.next_pause = _FIRST_PAUSE  # drafts land again: the next pause starts short
            return False
        state.paused_steps = state.next_pause
        state.next_pause = min(2 * state.next_pause, _LONGEST_PAUSE)
        state.accepted, state.rejected = _PRIOR_ACCEPTED, _PRIOR_REJECTED  # the probe starts afresh
        return True

    def record_shadow(self, request_id: str, hit: bool) -> None:
        """Take an unverified guess's outcome (a free proposer's first draft against the sampled token),
        as a one-draft verification's: a request whose prior does not pay for a verification starts
        drafting once its guesses land. A paused request keeps its pause (rare hits on an adversarial
        prompt would otherwise end it at once)."""
        state = self.states.setdefault(request_id, _RequestState())
        if state.paused_steps == 0:
            state.accepted = _DECAY * state.accepted + hit
            state.rejected = _DECAY * state.rejected + (not hit)

    def _pays(self, a: float) -> bool:
        """Whether a lone request's best chain at acceptance a beats its plain step clearly."""
        chains = (expected_tokens(a, k) / (self.cost(k + 1) + self.forward_cost * k)
                  for k in range(1, self.config.num_speculative_tokens + 1))
        return max(chains) > _CLEAR_GAIN / self.cost(1)

    def retain(self, live: set[str]) -> None:
        for rid in [r for r in self.states if r not in live]:
            del self.states[rid]
