"""Speculative token trees: the tree helpers, n-gram trees, tree verification (greedy exact, sampled
distributed as the target), and whole engines verifying trees against transformers' greedy output
through both attention backends, with accepted paths off the first branch (their K/V moved), under
preemption, and with logprobs as plain decoding gives them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from quadrant import SamplingParams
from quadrant.config import EngineConfig, KVTransferConfig, SpeculativeConfig
from quadrant.engine.request import Request
from quadrant.engine.spec.ngram import lookup, lookup_tree
from quadrant.engine.spec.proposer import Draft, Drafts
from quadrant.engine.spec.tree import (GrownTree, accepted_path, ancestor_masks, best_line, depths,
                                       merge_branches, path_moves)
from quadrant.engine.spec.verify import verify_tree
from quadrant.engine.step import WorkerRequest

transformers = pytest.importorskip("transformers")

from tests.engine.conftest import hf_greedy, make_engine, run_all  # noqa: E402

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


def test_tree_helpers():
    parents = [-1, -1, 0, 1, 3]  # root -> {0, 1}; 0 -> 2; 1 -> 3 -> 4
    tokens = [7, 8, 9, 10, 11]
    assert depths(parents) == [1, 1, 2, 2, 3]
    masks = ancestor_masks(parents)  # bit 0: the root; bit 1 + i: node i
    assert masks == [0b1, 0b11, 0b101, 0b1011, 0b10101, 0b110101]
    assert accepted_path(parents, tokens, [8, 10, 11]) == [1, 3, 4]
    assert path_moves([1, 3, 4]) == [(1, 0), (3, 1), (4, 2)]
    assert path_moves([0, 2]) == [(2, 1)]
    assert best_line(parents) == [0, 2] and best_line([-1, 0, 1]) == [0, 1, 2] and best_line([]) == []
    # 63 nodes in a chain: the last mask has bit 63 set and must stay a valid int64
    assert torch.tensor(ancestor_masks(list(range(-1, 62)))).dtype == torch.int64


def test_merge_branches_keeps_parents_before_children_and_the_heaviest_nodes():
    tokens, parents = merge_branches([(1.0, [1, 2, 3, 4]), (0.5, [1, 2, 5]), (0.25, [6, 7])], budget=6, decay=0.8)
    # Scores (weight x 0.8^depth): "1" 1.2, "1 2" 0.96, "3" 0.51, "4" 0.41, "5" 0.26, "6" 0.2, "7" 0.16.
    assert tokens == [1, 2, 3, 4, 5, 6]
    assert parents == [-1, 0, 1, 2, 1, -1]


def test_a_grown_tree_expands_its_likeliest_nodes_and_drafts_the_best_scored():
    tree = GrownTree(width=2, budget=4)
    tree.grow([[-0.1, -2.5]], [[5, 6]])  # the root's two likeliest tokens: nodes 0 and 1
    assert tree.frontier == [0, 1] and tree.worth_growing()
    assert tree.frontier_row() == ([5, 6], [-1, -1])
    tree.grow([[-0.2, -1.0], [-0.05, -3.0]], [[7, 8], [9, 10]])  # nodes 2..5: scores -0.3 -1.1 -2.55 -5.5
    assert tree.frontier == [2, 3]  # the two best of the new depth, not one per parent
    assert tree.worth_growing()  # -0.3 beats the 4th best score so far (-2.5)
    assert tree.frontier_row() == ([7, 8], [-1, -1, 0, 0])  # node 2's and 3's parent, node 0, sits in slot 0
    tree.grow([[-0.1, -0.2], [-4.0, -5.0]], [[11, 12], [13, 14]])  # nodes 6..9: -0.4 -0.5 -5.1 -6.1
    assert tree.frontier == [6, 7] and tree.worth_growing()
    assert tree.frontier_row() == ([11, 12], [-1, -1, 0, 0, 2, 2])
    tree.grow([[-3.0, -4.0], [-1.0, -2.0]], [[15, 16], [17, 18]])  # nodes 10..13: -3.4 -4.4 -1.5 -2.5
    assert not tree.worth_growing()  # the frontier's best (-1.5) cannot pass the 4th best (-0.5)
    assert tree.draft() == ([5, 7, 11, 12], [-1, 0, 1, 1])  # a line of the likeliest and a late fork


def test_ngram_tree_holds_every_distinct_continuation():
    seq = np.array([1, 2, 3, 4, 5, 9, 1, 2, 3, 6, 7, 8, 1, 2, 3])
    assert lookup(seq, 3, 2, 3) == [6, 7, 8]  # the chain: the latest match
    # Continuations 6 7 8 1 2 (weight 1) and 4 5 9 1 2 (0.5); five nodes by weight x 0.8^depth.
    assert lookup_tree(seq, 5, 2, 3, branches=2) == ([6, 7, 8, 1, 4], [-1, 0, 1, 2, -1])
    assert lookup_tree(seq, 5, 2, 3, branches=3)[0] == [6, 7, 8, 1, 4]  # no third occurrence
    assert lookup_tree(seq, 3, 2, 3, branches=1) == ([6, 7, 8], [-1, 0, 1])
    # Padded steps: the other branch only takes rows the best continuation's step pays for anyway.
    assert lookup_tree(seq, 3, 2, 3, branches=2, room=lambda best: 3) == ([6, 7, 8], [-1, 0, 1])
    asked = []
    assert lookup_tree(seq, 5, 2, 3, branches=2, room=lambda best: asked.append(best) or 2) == ([6, 7], [-1, 0])
    assert asked == [5]  # the best continuation's length


def _request(greedy: bool, output: list[int] | None = None) -> WorkerRequest:
    params = SamplingParams(max_tokens=8, temperature=0.0 if greedy else 1.0)
    return WorkerRequest("r", [1, 2], list(output or []), params, None, [])


def test_greedy_tree_verification_walks_the_targets_choices():
    tokens, parents = [3, 4, 1, 2], [-1, -1, 1, 2]  # root -> {3, 4}; 4 -> 1 -> 2
    logits = torch.full((5, 6), -5.0)
    logits[0, 4] = logits[2, 1] = logits[3, 2] = logits[4, 5] = 5.0  # the target says 4, 1, 2, then 5
    assert verify_tree(logits, tokens, parents, _request(True), None) == ([4, 1, 2, 5], [0, 2, 3, 4])
    logits[3, 2], logits[3, 0] = -5.0, 5.0  # ...4, 1, then 0: the tree has no such child
    assert verify_tree(logits, tokens, parents, _request(True), None) == ([4, 1, 0], [0, 2, 3])


def test_sampled_tree_verification_is_distributed_as_the_target():
    """Two certain drafts at the root, one more below the first: the first two tokens (the second from
    a plain step where the walk left the tree at once), jointly, against p1 x p2 (the target's rows repeat, so they do not depend on the path). p > 0.001: a
    correct verifier fails this one time in a thousand."""
    vocab, draws = 5, 12_000
    p1, p2 = torch.tensor([1.0, 0.2, -0.5, 0.7, 0.0]), torch.tensor([0.1, 1.2, 0.3, -1.0, 0.5])
    tokens, parents = [3, 0, 1], [-1, -1, 0]  # root -> {3, 0}; 3 -> 1
    logits = torch.stack([p1, p2, p2, torch.zeros(vocab)])
    gen = torch.Generator().manual_seed(0)
    pairs = []
    for _ in range(draws):
        out = verify_tree(logits, tokens, parents, _request(False), gen)[0]
        if len(out) == 1:  # off the tree: the next (plain) step draws the second token from p2
            out.append(int(torch.multinomial(p2.softmax(-1), 1, generator=gen)))
        pairs.append(out[:2])
    pairs = torch.tensor(pairs)
    joint = (p1.softmax(-1)[:, None] * p2.softmax(-1)[None, :]).flatten().double()
    counts = torch.bincount(pairs[:, 0] * vocab + pairs[:, 1], minlength=vocab * vocab).double()
    assert chisquare(counts.numpy(), (joint / joint.sum() * draws).numpy()).pvalue > 1e-3


class OracleTrees:
    """Trees whose first branch is always wrong and whose second holds the reference continuation (its
    last node wrong on odd lengths): every accepted draft lies off the first branch, so each
    verification must move K/V. A test proposer: the trees are chosen, the engine is real."""

    free = False
    last_forwards = None

    def __init__(self, references: dict[tuple[int, ...], list[int]], cut_odd: bool = True) -> None:
        self.references = references
        self.cut_odd = cut_odd  # False: the second branch is right to its end

    def propose(self, asks: list[tuple[Request, int]]) -> Drafts:
        drafts: Drafts = {}
        for req, k in asks:
            truth = self.references.get(tuple(req.prompt_ids), [])[len(req.output_ids):][:k]
            if not truth:
                continue
            if self.cut_odd and len(req.output_ids) % 2:
                truth = truth[:-1] + [(truth[-1] + 1) % 256]
            wrong = (truth[0] + 1) % 256
            tokens, parents = [wrong, truth[0], (wrong + 5) % 256], [-1, -1, 0]
            prev = 1
            for t in truth[1:]:
                tokens.append(t)
                parents.append(prev)
                prev = len(tokens) - 1
            drafts[req.request_id] = Draft(tokens, parents=parents)
        return drafts

    def observe(self, hidden) -> None:
        pass

    def retain(self, live: set[str]) -> None:
        pass


def oracle_engine(path, prompts, references, cut_odd=True, **options):
    engine = make_engine(path, speculative=SpeculativeConfig("ngram", 4, draft_cost=0.0, tree_branches=2), **options)
    engine.proposer = OracleTrees({tuple(p): r for p, r in zip(prompts, references)}, cut_odd)
    return engine


@pytest.mark.parametrize("regime", ["batched", "tiny-pool"])
def test_trees_greedy_identical_with_paths_off_the_first_branch(tiny, prompts, reference, regime):
    path, _ = tiny
    options = {"batched": {}, "tiny-pool": {"num_blocks": 30, "budget": 16}}[regime]
    engine = oracle_engine(path, prompts, reference, **options)
    assert run_all(engine, prompts) == reference
    stats = engine.spec_stats
    assert stats.num_tree_verifications == stats.num_verifications > 10
    assert stats.num_accepted_tokens > stats.num_verifications // 2
    if regime == "tiny-pool":
        assert engine.scheduler.num_preemptions > 0
    assert engine.kv.pool.num_free == engine.kv.pool.num_blocks


def test_prefix_cache_reuses_blocks_whose_tree_moves_came_after_their_request_ended(tiny, prompts, reference):
    """A request ends at a verification whose accepted path still has to move; its blocks are cached as
    it ends. A second request continuing its text reuses them (prefix cache) and must read the moved K/V:
    it continues exactly as transformers does."""
    path, _ = tiny
    engine = oracle_engine(path, prompts[:1], reference[:1], cut_odd=False)
    # 1 token from the prompt's step, then two verifications of 4 drafts each taking all 4 and one more.
    first = SamplingParams(max_tokens=11, temperature=0.0, ignore_eos=True)
    assert run_all(engine, prompts[:1], first) == [reference[0][:11]]
    assert engine.spec_stats.num_verifications == 2 and engine.scheduler.kv_moves  # still to move
    second = prompts[0] + reference[0][:11]
    assert run_all(engine, [second], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)) == \
        [reference[0][11:19]]
    assert engine.kv.hit_rate > 0


@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_trees_through_the_triton_kernels(tiny, prompts, reference, graphs):
    """The Triton kernels' tree masks under the interpreter (kept short): with CUDA graphs, each tree
    node a decode row of the graphs' padded buffers (off CUDA they run eagerly) through the split-KV
    decode kernel; without, the varlen kernel over multi-token rows."""
    path, _ = tiny
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    engine = oracle_engine(path, prompts[:2], reference[:2], attention_backend="triton", cuda_graphs=graphs)
    trees: list[int] = []
    if graphs:
        assert engine.runner.graphs.trees
        run = engine.runner.graphs.run

        def spy(*args):  # args[5]: the rows' tree spans and bits (verification rows of a tree)
            trees.append(len(args) > 5 and args[5] is not None)
            return run(*args)

        engine.runner.graphs.run = spy
    assert run_all(engine, prompts[:2], params) == [r[:8] for r in reference[:2]]
    assert engine.spec_stats.num_accepted_tokens > 0
    assert any(trees) == graphs  # tree verifications replayed the graphs
    if graphs:  # the next plain step resets the tree buffers: no stale span may mask a plain row
        from quadrant.engine.cuda_graphs import NO_SPAN

        graphs_ = engine.runner.graphs
        graphs_.run([1], [0], [-1], [0], [[0]])  # a row that writes and reads nothing
        assert (graphs_.tree_start == NO_SPAN).all() and (graphs_.tree_mask == -1).all()


def test_tree_logprobs_match_plain_decoding(tiny, prompts, reference):
    path, _ = tiny
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2)
    outs = []
    for engine in (make_engine(path), oracle_engine(path, prompts[:1], reference[:1])):
        engine.add_request(prompts[0], params, request_id="r")
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    outs.append(out.outputs[0])
    plain, tree = outs
    assert tree.token_ids == plain.token_ids == reference[0][:12]
    for a, b in zip(tree.logprobs, plain.logprobs, strict=True):
        assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-4
        assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_ngram_trees_greedy_identical(tiny):
    """Real n-gram trees: a phrase seen with three different continuations, then repeated; unigram
    lookups (the tiny model's output repeats tokens with different successors) make more trees."""
    path, model = tiny
    phrase = [5, 17, 99, 3]
    prompt = phrase + [40, 41, 42] + phrase + [50, 51, 52] + phrase + [60, 61] + phrase * 3
    expected = hf_greedy(model, prompt, 20)
    engine = make_engine(path, speculative=SpeculativeConfig("ngram", 6, draft_cost=0.0, tree_branches=3,
                                                             prompt_lookup_min=1))
    assert run_all(engine, [prompt], GREEDY) == [expected]
    assert engine.spec_stats.num_tree_verifications > 0


def test_tree_settings_refused_clearly(tiny):
    with pytest.raises(ValueError, match="ngram or eagle; draft models draft chains"):
        SpeculativeConfig("draft", 3, tree_branches=2)
    with pytest.raises(ValueError, match="8-bit caches"):
        make_engine(tiny[0], cache_dtype="int8", speculative=SpeculativeConfig("ngram", 3, tree_branches=2))
    with pytest.raises(ValueError, match="--role prefill/decode"):
        EngineConfig(tiny[0], kv_transfer=KVTransferConfig(role="decode"),
                     speculative=SpeculativeConfig("ngram", 3, tree_branches=2))
