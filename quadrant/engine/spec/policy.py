"""When to speculate, and how many tokens.

A verifying step costs more than a one-token step: on this project's CPU kernels each extra token
in the row adds about a quarter of a decode step (measured: BENCHMARKS.md), on a GPU a few percent
(decode reads the weights once, whatever the row count). So speculating k tokens pays only if the
tokens it is expected to add, (1 - a^(k+1)) / (1 - a) for a per-draft acceptance probability a,
beat its cost, 1 + c k for a relative cost c per drafted token (`draft_cost`). Each request keeps a
decayed count of accepted drafts and of rejections (a verification that did not take all its drafts
saw one), estimates a from them, and asks for the k in 1..K with the best expected tokens per unit
of cost. When no k pays (a <= c), the request pauses for a number of steps that doubles at every
repeat (4, 8, ... 64), then probes again; a good probe resumes it. Above `max_batch_size` decoding
requests no step speculates (the step is compute-bound; peers measure 1.4-1.8x slowdowns there).
Drafts never pass the request's max_tokens or the model's context.
"""

from __future__ import annotations

from dataclasses import dataclass

from quadrant.config import SpeculativeConfig
from quadrant.engine.request import Request

_FIRST_PAUSE, _LONGEST_PAUSE = 4, 64
_DECAY = 0.8  # weight of the history at each new verification
_PRIOR_ACCEPTED, _PRIOR_REJECTED = 2.0, 1.0  # a new request starts from a = 2/3


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


def best_num_drafts(acceptance: float, max_k: int, draft_cost: float) -> int:
    """The k in 0..max_k with the most expected tokens per unit of step cost (0: plain decoding)."""
    best_k, best = 0, 1.0
    for k in range(1, max_k + 1):
        gain = expected_tokens(acceptance, k) / (1.0 + draft_cost * k)
        if gain > best * 1.02:  # a longer row must pay clearly
            best_k, best = k, gain
    return best_k


class SpeculationPolicy:
    def __init__(self, config: SpeculativeConfig, max_model_len: int, draft_cost: float) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.draft_cost = draft_cost
        self.states: dict[str, _RequestState] = {}

    def num_drafts(self, req: Request) -> int:
        """Draft tokens to ask for this request's next step (0: do not speculate)."""
        state = self.states.setdefault(req.request_id, _RequestState())
        if state.paused_steps > 0:
            state.paused_steps -= 1
            return 0
        # The verifying step adds at most k + 1 tokens: past max_tokens or the context they are wasted.
        left = min(req.params.max_tokens - len(req.output_ids), self.max_model_len - req.num_tokens) - 1
        k = min(self.config.num_speculative_tokens, left)
        if k <= 0:
            return 0
        # A probe after a pause tries one token at least, or the estimate could never recover.
        return max(1, best_num_drafts(state.acceptance, k, self.draft_cost))

    def record(self, request_id: str, drafted: int, accepted: int) -> bool:
        """Take a verification's outcome; True when the request now backs off."""
        state = self.states.setdefault(request_id, _RequestState())
        state.accepted = _DECAY * state.accepted + accepted
        state.rejected = _DECAY * state.rejected + (1.0 if accepted < drafted else 0.0)
        if best_num_drafts(state.acceptance, self.config.num_speculative_tokens, self.draft_cost) > 0:
            state.next_pause = _FIRST_PAUSE
            return False
        state.paused_steps = state.next_pause
        state.next_pause = min(2 * state.next_pause, _LONGEST_PAUSE)
        return True

    def retain(self, live: set[str]) -> None:
        for rid in [r for r in self.states if r not in live]:
            del self.states[rid]
