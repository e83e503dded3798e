"""A draft model proposes: a smaller model of the target's vocabulary, with its own KV cache.

Any model quadrant loads can draft (`--speculative-model`), the target itself included, and cut to
its first N layers (`--speculative-draft-layers`: a layer-truncated copy needs no checkpoint of its
own). It lives on the driver beside the scheduler: per request it keeps a block table in its own
pool and how many of the request's tokens its cache holds. Each proposal first runs whatever the
draft has not seen (the whole prompt the first time; afterwards the target's last token and any
drafts it accepted, whose K/V the draft already wrote, are simply kept), then k - 1 one-token
steps, every request of the batch together. Drafts of sampled requests are drawn from the draft's
distribution built with the request's own options, and that distribution goes with them for
lossless verification (verify.py); greedy requests draft greedily.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from quadrant.config import EngineConfig, SpeculativeConfig
from quadrant.engine.executor import open_source, resolve_weight_format
from quadrant.engine.request import Request
from quadrant.engine.runner import Batch, ModelRunner
from quadrant.engine.spec.proposer import Draft, Drafts
from quadrant.engine.spec.verify import distribution, greedy_choice
from quadrant.engine.step import Hidden, ScheduledRow, WorkerRequest

if TYPE_CHECKING:
    from quadrant.engine.engine import LLMEngine


@dataclass
class _DraftState:
    """What the draft's cache holds of one request."""

    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # leading tokens of the request whose K/V the draft holds, known right
    fed: list[int] = field(default_factory=list)  # drafts fed after those: right only if the target accepts them
    generator: torch.Generator | None = None  # seeded requests draw their drafts reproducibly


_Row = tuple[Request, int, _DraftState, WorkerRequest]  # a request, its k, its draft state, its mirror


_CATCH_UP_TIMED = 16  # a first forward over more tokens than this is left out of the cost measurement


class DraftModelProposer:
    free = False  # every draft token is a forward of the draft model

    def __init__(self, runner: ModelRunner, num_blocks: int) -> None:
        self.last_forwards: tuple[float, int] | None = None
        self.runner = runner
        self.block_size = runner.block_size
        self.free_blocks = list(range(num_blocks))
        self.states: dict[str, _DraftState] = {}
        self.generator = torch.Generator(device=runner.device)
        self.generator.seed()

    @classmethod
    def for_engine(cls, spec: SpeculativeConfig, engine: LLMEngine) -> "DraftModelProposer":
        """Load the draft beside the engine's target: same dtype, device and block size, a pool as large
        as the target's (a draft is never deeper than its target, so it takes at most as much memory)."""
        target = engine.config
        config = EngineConfig(spec.model or target.model, target.dtype, target.device,
                              target.weight_format if spec.model is None else "auto", target.cache,
                              load_format=target.load_format if spec.model is None else "auto")
        source = open_source(config)
        if spec.draft_layers is not None:
            source = source.truncated(spec.draft_layers)
        if source.config.vocab_size != engine.model_config.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({source.config.vocab_size} tokens) is not the "
                             f"target's ({engine.model_config.vocab_size}): they must share a tokenizer")
        dtype = getattr(torch, target.dtype)
        if config.load_format == "dummy":
            model = source.load_dummy_model(dtype, target.device)
        else:
            model = source.load_model(dtype, target.device, resolve_weight_format(config, source))
        source.release()
        num_blocks = engine.kv.pool.num_blocks
        runner = ModelRunner(model, source.config, target.cache, num_blocks, dtype, target.device,
                             target.resolved_backend, max_model_len=engine.max_model_len, samples=False)
        return cls(runner, num_blocks)

    # -- per request state ---------------------------------------------------------------------
    def observe(self, hidden: Hidden) -> None:
        pass  # a draft model reads tokens, not the target's hidden states

    def retain(self, live: set[str]) -> None:
        for rid in [r for r in self.states if r not in live]:
            self.free_blocks.extend(self.states.pop(rid).block_table)

    def _sync(self, req: Request) -> _DraftState:
        """The request's draft state, with the drafts the target accepted since counted as computed."""
        state = self.states.get(req.request_id)
        if state is None:
            state = _DraftState()
            if req.seed is not None:
                state.generator = torch.Generator(device=self.runner.device).manual_seed(req.seed ^ 0x5EED)
            self.states[req.request_id] = state
        tokens = req.all_token_ids
        kept = 0
        while kept < len(state.fed) and state.num_computed + kept < len(tokens) - 1 \
                and tokens[state.num_computed + kept] == state.fed[kept]:
            kept += 1
        state.num_computed += kept
        state.fed = []
        return state

    def _reserve(self, state: _DraftState, num_tokens: int) -> bool:
        need = -(-num_tokens // self.block_size) - len(state.block_table)
        if need > len(self.free_blocks):
            return False
        for _ in range(max(need, 0)):
            state.block_table.append(self.free_blocks.pop())
        return True

    # -- proposing -----------------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, asks: list[tuple[Request, int]]) -> Drafts:
        start = time.perf_counter()  # the whole call: mirrors and sampling cost as much as forwards here
        self.last_forwards = None
        rows = self._rows(asks, lambda k: k - 1)  # positions up to the last draft fed (the k-th is only sampled)
        if not rows:
            return {}
        batch, carry = self._first_pass(rows)
        drafts: dict[str, list[int]] = {req.request_id: [] for req, *_ in rows}
        probs: dict[str, list[torch.Tensor]] = {req.request_id: [] for req, *_ in rows}
        active = rows
        # Timed for the policy's cost per draft: every forward, unless the first catches up on many
        # tokens (a new request's prompt, a long pause), which would read as a costly proposer.
        timed = max(row.num_new_tokens for _, row in batch) <= _CATCH_UP_TIMED
        forwards = 0
        while True:
            logits, carry = self._forward(batch, carry)
            for (req, _, _, mirror), row_logits in zip(active, logits):
                token, q = self._choose(row_logits, mirror)
                drafts[req.request_id].append(token)
                if q is not None:
                    probs[req.request_id].append(q)
            keep = [i for i, (req, k, _, _) in enumerate(active) if len(drafts[req.request_id]) < k]
            forwards += 1
            if not keep:
                if timed:
                    self.last_forwards = (time.perf_counter() - start, forwards)
                break
            active = [active[i] for i in keep]
            if carry is not None:
                carry = carry[torch.tensor(keep, device=carry.device)]
            # Then one token at a time: each still-drafting request's newest draft.
            batch = []
            for req, _, state, mirror in active:
                token = drafts[req.request_id][-1]
                mirror.output_ids.append(token)
                self._fed(state, token)
                batch.append((mirror, ScheduledRow(req.request_id, mirror.num_tokens - 1, 1)))
        return {req.request_id: Draft(drafts[req.request_id],
                                      torch.stack(probs[req.request_id]) if probs[req.request_id] else None)
                for req, *_ in rows}

    def _rows(self, asks: list[tuple[Request, int]], reach: Callable[[int], int]) -> list[_Row]:
        """Each asked request's row, with blocks for its slots up to num_tokens + reach(k); a request
        goes without drafts this step when the draft's pool is full."""
        rows: list[_Row] = []
        for req, k in asks:
            state = self._sync(req)
            if not self._reserve(state, req.num_tokens + reach(k)):
                continue
            mirror = WorkerRequest(req.request_id, req.prompt_ids, list(req.output_ids), req.params,
                                   state.generator, state.block_table)
            rows.append((req, k, state, mirror))
        return rows

    def _first_pass(self, rows: list[_Row]) -> tuple[Batch, torch.Tensor | None]:
        """The first batch: what the draft has not seen yet, up to each request's last token; and
        what the draft carries from one forward to the next (a draft model: nothing)."""
        batch = [(mirror, ScheduledRow(req.request_id, state.num_computed, req.num_tokens - state.num_computed))
                 for req, _, state, mirror in rows]
        for _, _, state, mirror in rows:
            state.num_computed = mirror.num_tokens
        return batch, None

    def _forward(self, batch: Batch, carry: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B, V] at each row's last token, and the carry for the rows' next tokens."""
        logits = self.runner.forward_logits(batch, [1] * len(batch))
        assert logits is not None
        return logits, None

    def _fed(self, state: _DraftState, token: int) -> None:
        state.fed.append(token)  # kept in the draft's cache if the target accepts it (_sync)

    def _choose(self, logits: torch.Tensor, mirror: WorkerRequest) -> tuple[int, torch.Tensor | None]:
        """The next draft token, and for sampled requests the distribution it was drawn from."""
        if mirror.params.greedy:
            token = greedy_choice(logits, mirror, mirror.output_ids)
            return (token if token is not None else 0), None
        q = distribution(logits, mirror, mirror.output_ids)
        if q is None:  # a draft that cannot sample proposes anything: verification stays exact
            q = torch.full_like(logits, 1.0 / logits.shape[-1])
        gen = mirror.generator if mirror.generator is not None else self.generator
        return int(torch.multinomial(q, 1, generator=gen)), q
