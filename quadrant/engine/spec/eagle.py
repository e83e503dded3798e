"""An EAGLE head proposes (models/eagle.py): one decoder layer over the target's hidden states.

Every target step hands the driver its rows' final hidden states (`StepOutput.hidden`); the
proposer keeps, per request, those the head has not read yet. Head position p reads token p and
the target's hidden state at p - 1, so once the target has computed a request's first n - 1
tokens, the head can catch up to position n - 1 with true hidden states, and its guess there
drafts token n. Each further draft feeds the head its own previous guess. The head's K/V at the
positions it ran on guesses are rewritten from true hidden states at the next proposal (they are
never kept), so the head's cache, like the target's, only ever holds what the target confirmed.

With `--speculative-tree-branches N` the head grows a token tree instead (EAGLE-2, Li et al. 2024;
tree.GrownTree): each further forward runs the N best-scored nodes of the newest depth as one row
per request, in the head's slots after the request's last token, each node attending to the cache
and its own ancestors. After the target verifies the tree, the runner hands over the hidden states
of the accepted path in order, as a chain's.

Block tables, the head's pool and the sampling of drafts are the draft model's (draft.py); a
prompt position the target did not compute (a prefix-cache hit) reads a zero hidden state: the
drafts there are poorer, never wrong, since the target verifies them all.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from quadrant.config import SpeculativeConfig
from quadrant.engine.executor import InProcessExecutor
from quadrant.engine.request import Request
from quadrant.engine.runner import Batch, ModelRunner
from quadrant.engine.spec.draft import _CATCH_UP_TIMED, DraftModelProposer, _DraftState, _Row
from quadrant.engine.spec.proposer import Draft, Drafts
from quadrant.engine.spec.tree import MAX_TREE_NODES, GrownTree, is_chain
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
    def __init__(self, runner: ModelRunner, num_blocks: int, branches: int = 1) -> None:
        super().__init__(runner, num_blocks)
        self.features: dict[str, _Features] = {}
        self.width = runner.model.config.hidden_size
        self.branches = branches  # > 1: token trees (tree.GrownTree) expanding this many nodes per depth
        # Trees: the nodes a lone request's tree may hold, given the chain length k the policy planned (set
        # by the engine where steps run padded graphs, as for n-gram trees); None, or several requests: k.
        self.room: Callable[[int], int] | None = None

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
        return cls(runner, num_blocks, spec.tree_branches)

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

    # -- token trees ---------------------------------------------------------------------------
    def propose(self, asks: list[tuple[Request, int]]) -> Drafts:
        """Chains, or with branches trees; a request under a grammar drafts a chain either way (the
        engine would cut its tree to one line, shorter than the chain the same forwards give)."""
        if self.branches == 1:
            return super().propose(asks)
        chains = [(req, k) for req, k in asks if req.grammar is not None]
        trees = [(req, k) for req, k in asks if req.grammar is None]
        drafts: Drafts = {}
        timings = []
        for part, run in ((chains, super().propose), (trees, self._propose_trees)):
            if part:
                drafts.update(run(part))
                timings.append(self.last_forwards)
        # Both parts timed: their forwards together (one untimed part leaves the call untimed).
        self.last_forwards = None if None in timings or not timings else \
            (sum(t[0] for t in timings if t), sum(t[1] for t in timings if t))
        return drafts

    def _depth(self, k: int) -> int:
        """Depths a tree for a chain of k grows (one head forward each, the catch-up the first); the
        nodes it expands must fit one int64 of ancestor bits."""
        return min(k, MAX_TREE_NODES // self.branches + 1)

    @torch.inference_mode()
    def _propose_trees(self, asks: list[tuple[Request, int]]) -> Drafts:
        """A tree per request, grown a depth per forward. The head runs each tree's frontier as one row
        that attends to the request's cache and to each node's own ancestors, the frontiers before it,
        whose K/V the head wrote in the slots after the request's last token. Each node reads the head's
        state at its parent. The drafts are certain: verification keeps a node with the target's own
        probability of it (verify.verify_tree), whatever the head thought of it."""
        start = time.perf_counter()
        self.last_forwards = None
        rows = self._rows(asks, lambda k: (self._depth(k) - 1) * self.branches)
        if not rows:
            return {}
        batch, carry = self._first_pass(rows)
        assert carry is not None
        timed = max(row.num_new_tokens for _, row in batch) <= _CATCH_UP_TIMED
        hidden, ends = self._head_states(batch, carry)
        last = hidden[torch.tensor(ends, device=hidden.device) - 1]  # each request's state at its last token
        # A lone request's tree fills the rows its step's graph pads anyway; several requests' trees keep to
        # the plan (their steps' padding is shared), and no tree's slots pass the context.
        lone = self.room if self.room is not None and len(rows) == 1 else None
        trees = [GrownTree(self.branches, min(lone(k) if lone is not None else k,
                                              self.runner.max_model_len - req.num_tokens - 1))
                 for req, k, _, _ in rows]
        # Per request, the nodes the last forward ran (-1: the root, in the catch-up) and its states at them.
        ran_nodes = {req.request_id: [-1] for req, *_ in rows}
        ran_states = {req.request_id: last[i : i + 1] for i, (req, *_) in enumerate(rows)}
        self._grow(trees, last)
        forwards = 1
        while True:
            active = [(tree, req, mirror) for tree, (req, k, _, mirror) in zip(trees, rows)
                      if forwards < self._depth(k) and tree.worth_growing()]
            if not active:
                break
            batch, feed = [], []
            for tree, req, mirror in active:
                nodes, states = ran_nodes[req.request_id], ran_states[req.request_id]
                feed.append(states[torch.tensor([nodes.index(tree.parents[n]) for n in tree.frontier],
                                                device=states.device)])
                ran_nodes[req.request_id] = list(tree.frontier)
                tokens, parents = tree.frontier_row()
                first = req.num_tokens + len(parents) - len(tokens)  # the slot after the frontiers before it
                batch.append((mirror, ScheduledRow(req.request_id, first, len(tokens), tokens, None, parents)))
            hidden, ends = self._head_states(batch, torch.cat(feed))
            for (_, req, _), lo, hi in zip(active, [0] + ends[:-1], ends):
                ran_states[req.request_id] = hidden[lo:hi]
            self._grow([tree for tree, _, _ in active], hidden)
            forwards += 1
        if timed:
            self.last_forwards = (time.perf_counter() - start, forwards)
        drafts: Drafts = {}
        for tree, (req, *_) in zip(trees, rows):
            tokens, parents = tree.draft()
            drafts[req.request_id] = Draft(tokens, None, None if is_chain(parents) else parents)
        return drafts

    def _head_states(self, batch: Batch, carry: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """The head's output states [T, D] at every token of the batch, and each row's end in them."""
        ids, pos, meta = self.runner.prepare(batch)
        return self.runner.model(ids, pos, meta, carry), list(meta.query_start_loc_cpu[1:])

    def _grow(self, trees: list[GrownTree], states: torch.Tensor) -> None:
        """Grow each tree by a depth from the head's states at its frontier (rows of `states`, in order)."""
        head = self.runner.model
        top, picks = head.draft_logits(states).log_softmax(-1).topk(self.branches, dim=-1)
        logprobs, tokens = top.tolist(), head.draft_vocab[picks].tolist()
        at = 0
        for tree in trees:
            n = len(tree.frontier)
            tree.grow(logprobs[at : at + n], tokens[at : at + n])
            at += n
