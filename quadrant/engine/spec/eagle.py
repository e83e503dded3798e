"""An EAGLE head proposes (models/eagle.py): one decoder layer over the target's hidden states.

Every target step hands the driver its rows' final hidden states (`StepOutput.hidden`); the
proposer keeps, per request, those the head has not read yet. Head position p reads token p and
the target's hidden state at p - 1, so once the target has computed a request's first n - 1
tokens, the head can catch up to position n - 1 with true hidden states, and its guess there
drafts token n. Each further draft feeds the head its own previous guess. The head's K/V at the
positions it ran on guesses are rewritten from true hidden states at the next proposal (they are
never kept), so the head's cache, like the target's, only ever holds what the target confirmed.

Block tables, the head's pool and the sampling of drafts are the draft model's (draft.py); a
prompt position the target did not compute (a prefix-cache hit) reads a zero hidden state: the
drafts there are poorer, never wrong, since the target verifies them all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from quadrant.config import SpeculativeConfig
from quadrant.engine.executor import InProcessExecutor
from quadrant.engine.runner import Batch, ModelRunner
from quadrant.engine.spec.draft import DraftModelProposer, _DraftState, _Row
from quadrant.engine.step import Hidden, ScheduledRow
from quadrant.errors import QuadrantError
from quadrant.models.eagle import head_config, load_head

if TYPE_CHECKING:
    from quadrant.engine.engine import LLMEngine


class _Features:
    """A request's target hidden states from position `start` on, the ones the head has yet to read."""

    def __init__(self) -> None:
        self.start = 0
        self.rows: torch.Tensor | None = None  # [n, D]

    def put(self, first: int, hidden: torch.Tensor) -> None:
        """A step's hidden states from position `first`: they replace whatever was kept from there on
        (a rejected draft's stale rows, a preempted request's recomputation)."""
        if self.rows is None or first < self.start:
            self.start, self.rows = first, hidden.clone()
            return
        kept = self.rows[: first - self.start]
        gap = first - self.start - kept.shape[0]  # positions no step computed (prefix-cache hits)
        parts = [kept] + ([hidden.new_zeros(gap, hidden.shape[1])] if gap > 0 else []) + [hidden]
        self.rows = torch.cat(parts)

    def take(self, first: int, end: int, width: int, like: torch.Tensor) -> torch.Tensor:
        """Hidden states of positions [first, end) (zeros where unknown, and for position -1), then
        forget everything before `end - 1`, the last the head will read again."""
        out = like.new_zeros(end - first, width)
        if self.rows is not None:
            lo, hi = max(first, self.start), min(end, self.start + self.rows.shape[0])
            if hi > lo:
                out[lo - first : hi - first] = self.rows[lo - self.start : hi - self.start]
            drop = max(0, min(end - 1, self.start + self.rows.shape[0]) - self.start)
            self.rows, self.start = self.rows[drop:], self.start + drop
        return out


class EagleProposer(DraftModelProposer):
    def __init__(self, runner: ModelRunner, num_blocks: int) -> None:
        super().__init__(runner, num_blocks)
        self.features: dict[str, _Features] = {}
        self.width = runner.model.config.hidden_size

    @classmethod
    def for_engine(cls, spec: SpeculativeConfig, engine: LLMEngine) -> "EagleProposer":  # type: ignore[override]
        if not isinstance(engine.executor, InProcessExecutor):
            raise QuadrantError("--speculative-method eagle runs with a one-process engine (no --tp/--ep yet)")
        assert spec.model is not None
        target = engine.config
        dtype = getattr(torch, target.dtype)
        head = load_head(spec.model, engine.model_config, dtype, target.device)
        head.bind_embedding(engine.model.model.embed_tokens)
        num_blocks = engine.kv.pool.num_blocks
        runner = ModelRunner(head, head_config(engine.model_config), target.cache, num_blocks, dtype, target.device,
                             target.resolved_backend, max_model_len=engine.max_model_len, samples=False)
        return cls(runner, num_blocks)

    def observe(self, hidden: Hidden) -> None:
        for rid, (first, rows) in hidden.items():
            self.features.setdefault(rid, _Features()).put(first, rows)

    def retain(self, live: set[str]) -> None:
        super().retain(live)
        for rid in [r for r in self.features if r not in live]:
            del self.features[rid]

    def _first_pass(self, rows: list[_Row]) -> tuple[Batch, torch.Tensor | None]:
        """The head catches up to each request's last token on the target's hidden states; it carries
        those states (then its own guesses) from one forward to the next."""
        like = next(self.runner.model.parameters())
        batch, feats = [], []
        for req, _, state, mirror in rows:
            first = min(state.num_computed, req.num_tokens - 1)
            batch.append((mirror, ScheduledRow(req.request_id, first, req.num_tokens - first)))
            feats.append(self.features.setdefault(req.request_id, _Features())
                         .take(first - 1, req.num_tokens - 1, self.width, like))
            state.num_computed = req.num_tokens  # true hidden states up to here; later positions are guesses
        return batch, torch.cat(feats)

    def _forward(self, batch: Batch, carry: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        assert carry is not None
        head = self.runner.model
        ids, pos, meta = self.runner.prepare(batch)
        hidden = head(ids, pos, meta, carry)
        last = hidden[torch.tensor(meta.query_start_loc_cpu[1:], device=hidden.device) - 1]
        return head.compute_logits(last), last  # each row's guess, fed back with its next token

    def _fed(self, state: _DraftState, token: int) -> None:
        pass  # K/V the head wrote from its own guesses is rewritten at the next proposal, never kept
