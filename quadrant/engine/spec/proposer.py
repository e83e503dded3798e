"""The proposer interface, its factory, and the counters /metrics reports.

A proposer runs on the driver between steps: for each decoding request it is asked about, it
returns up to k tokens it expects to follow the request's tokens (and, when it sampled them from a
distribution, that distribution, which lossless verification needs). The scheduler then runs them
after the request's last token in the next step, and the runner verifies them (verify.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from quadrant.config import SpeculativeConfig
from quadrant.engine.request import Request
from quadrant.engine.step import Hidden

if TYPE_CHECKING:
    from quadrant.engine.engine import LLMEngine



@dataclass
class Draft:
    """One request's drafts: a chain, or a token tree (spec/tree.py) where `parents` is given."""

    tokens: list[int]
    probs: torch.Tensor | None = None  # [k, V]: the distributions a chain was drawn from; None: certain drafts
    parents: list[int] | None = None  # each node's parent index (-1: the request's last token); None: a chain


Drafts = dict[str, Draft]  # request id -> its drafts


class Proposer(Protocol):
    # Whether drafting costs next to nothing (no model to run): then the engine also drafts one token for
    # the requests that do not speculate this step, unverified, and checks it against the token the step
    # samples: evidence of acceptance that costs no verification (policy.record_shadow).
    free: bool
    # (seconds, forwards) of the last propose call's forwards, for the policy's cost per draft; None when
    # none ran, or the first caught up on many tokens (a new request's prompt: not a draft's cost).
    last_forwards: tuple[float, int] | None

    def propose(self, asks: list[tuple[Request, int]]) -> Drafts:
        """Drafts for each (request, at most k tokens); a request may get none."""

    def retain(self, live: set[str]) -> None:
        """Forget every request not in `live` (finished, aborted or preempted)."""

    def observe(self, hidden: Hidden) -> None:
        """Take a target step's final hidden states (EAGLE reads them; the others ignore them)."""


@dataclass
class SpecStats:
    """Totals since start. Acceptance rate: accepted / drafted tokens. Acceptance length: tokens a
    verifying row adds per step (accepted drafts + the target's own), the speed-up's upper bound."""

    num_verifications: int = 0  # request-steps that verified drafts
    num_tree_verifications: int = 0  # of them, those whose drafts formed a token tree (not a chain)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_backoffs: int = 0  # times a request stopped speculating for low acceptance
    num_large_batch_steps: int = 0  # steps that skipped speculation: too many requests decoding

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def acceptance_length(self) -> float:
        return 1.0 + self.num_accepted_tokens / self.num_verifications if self.num_verifications else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"verifications": self.num_verifications, "tree_verifications": self.num_tree_verifications,
                "draft_tokens": self.num_draft_tokens,
                "accepted_tokens": self.num_accepted_tokens, "backoffs": self.num_backoffs,
                "large_batch_steps": self.num_large_batch_steps, "acceptance_rate": self.acceptance_rate,
                "acceptance_length": self.acceptance_length}


def make_proposer(config: SpeculativeConfig, engine: LLMEngine) -> Proposer:
    if config.method == "ngram":
        from quadrant.engine.spec.ngram import NgramProposer

        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max, config.tree_branches)
    if config.method == "draft":
        from quadrant.engine.spec.draft import DraftModelProposer

        return DraftModelProposer.for_engine(config, engine)
    if config.method == "eagle":
        from quadrant.engine.spec.eagle import EagleProposer

        return EagleProposer.for_engine(config, engine)
    raise ValueError(f"no proposer for speculative method {config.method!r}")
