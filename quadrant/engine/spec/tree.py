"""Token trees: several draft continuations verified in one target forward.

A tree is its nodes' tokens and parents in topological order: `parents[i]` is the index of node i's
parent, -1 for the request's last token (the root). A chain is the tree whose parents are
[-1, 0, 1, ...]; it is sent as no parents at all. In the verifying row, node i runs at index
`last + 1 + i` (its KV slot) and position `last + depth(i)` (its rotary position), and attends to the
sequence up to its root and to its own ancestors only: `ancestor_masks` gives those as one int64 per
row token, bit j standing for the row's j-th token (0: the root).

After verification the accepted nodes, a root-to-leaf path, hold their K/V at their node indices;
`path_moves` says which slots must move so the path lies at last + 1, last + 2, ... like a chain's.
"""

from __future__ import annotations

from collections.abc import Sequence

# Nodes of one tree at most: a row's ancestor bits fit one int64 (root + 63 nodes).
MAX_TREE_NODES = 63


def is_chain(parents: Sequence[int]) -> bool:
    return all(p == i - 1 for i, p in enumerate(parents))


def depths(parents: Sequence[int]) -> list[int]:
    """Each node's depth: 1 for the root's children."""
    out: list[int] = []
    for p in parents:
        out.append(1 if p < 0 else out[p] + 1)
    return out


def ancestor_masks(parents: Sequence[int]) -> list[int]:
    """For the root and each node: bit j set where row token j (0: the root, 1 + i: node i) is the token
    itself or one of its ancestors; the attention a token of the row may pay within the row."""
    assert len(parents) <= MAX_TREE_NODES, "a tree's row must fit one int64 of ancestor bits"
    masks = [1]
    for i, p in enumerate(parents):
        masks.append(masks[p + 1] | (1 << (i + 1)))
    # As signed int64: the top bit (node 62) would overflow a torch.int64 tensor otherwise.
    return [m - (1 << 64) if m >= 1 << 63 else m for m in masks]


def children(parents: Sequence[int], tokens: Sequence[int], node: int) -> dict[int, int]:
    """token -> child index of `node` (-1: the root); the first child wins where tokens repeat."""
    out: dict[int, int] = {}
    for i, p in enumerate(parents):
        if p == node and tokens[i] not in out:
            out[tokens[i]] = i
    return out


def accepted_path(parents: Sequence[int], tokens: Sequence[int], accepted: Sequence[int]) -> list[int]:
    """The nodes the accepted draft tokens were, root downwards."""
    path, node = [], -1
    for token in accepted:
        node = children(parents, tokens, node)[token]
        path.append(node)
    return path


def best_line(parents: Sequence[int]) -> list[int]:
    """The nodes of the line that takes the first child at every level (a drafted tree lists siblings
    best first): its best continuation."""
    line, node = [], -1
    while (child := next((i for i, p in enumerate(parents) if p == node), None)) is not None:
        line.append(child)
        node = child
    return line


def path_moves(path: Sequence[int]) -> list[tuple[int, int]]:
    """(from node index, to node index) for each accepted node not already where a chain's would be.
    path[j] >= j (topological order), so moving them in order never overwrites one still to move."""
    return [(node, j) for j, node in enumerate(path) if node != j]


def merge_branches(branches: Sequence[tuple[float, Sequence[int]]], budget: int,
                   decay: float) -> tuple[list[int], list[int]]:
    """A tree of at most `budget` nodes from weighted continuations (weight, tokens): their trie, whose
    node weight is the summed weight of the continuations through it; the nodes kept are those of the
    highest weight x decay^depth (a parent always outranks its children), emitted in the order kept."""
    trie: dict[tuple[int, int], int] = {}  # (parent trie node, token) -> trie node
    weight: list[float] = []
    parent: list[int] = []
    token: list[int] = []
    depth: list[int] = []
    for w, continuation in branches:
        node = -1
        for t in continuation:
            key = (node, t)
            if key not in trie:
                trie[key] = len(weight)
                weight.append(0.0)
                parent.append(node)
                token.append(t)
                depth.append(1 if node < 0 else depth[node] + 1)
            node = trie[key]
            weight[node] += w
    # A child's weight never exceeds its parent's and it is one level deeper, so sorting by score (ties:
    # shallower first, then first made) keeps every node's parent ahead of it.
    order = sorted(range(len(weight)), key=lambda n: (-weight[n] * decay ** depth[n], depth[n], n))[:budget]
    index = {n: i for i, n in enumerate(order)}
    return [token[n] for n in order], [index[parent[n]] if parent[n] >= 0 else -1 for n in order]


class GrownTree:
    """A token tree grown from a proposer's log-probabilities, as EAGLE-2 does (Li et al. 2024): each
    depth, the `width` best-scored nodes of the newest depth are expanded by their `width` likeliest
    tokens. A node's score is its path's summed log-probability, which never rises along a path, so
    the draft, the `budget` best-scored nodes, keeps every kept node's parent, and growing can stop
    as soon as no frontier node outscores the budget-th node already grown."""

    def __init__(self, width: int, budget: int) -> None:
        self.width, self.budget = width, min(budget, MAX_TREE_NODES)
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.scores: list[float] = []
        self.depths: list[int] = []
        self.frontier: list[int] = [-1]  # the nodes whose children come next (-1: the root)
        self.expanded: list[int] = []  # nodes run through the proposer, in the order of its K/V slots

    def grow(self, logprobs: Sequence[Sequence[float]], tokens: Sequence[Sequence[int]]) -> None:
        """Add each frontier node's children (its likeliest tokens and their log-probabilities, frontier
        order); the `width` best of them are the next frontier."""
        new = []
        for node, lps, toks in zip(self.frontier, logprobs, tokens):
            base, depth = (self.scores[node], self.depths[node] + 1) if node >= 0 else (0.0, 1)
            for lp, t in zip(lps, toks):
                new.append(len(self.tokens))
                self.tokens.append(t)
                self.parents.append(node)
                self.scores.append(base + lp)
                self.depths.append(depth)
        self.frontier = sorted(new, key=lambda n: -self.scores[n])[: self.width]

    def worth_growing(self) -> bool:
        """Whether a child of the frontier could still make the draft."""
        if len(self.tokens) < self.budget:
            return True
        kth = sorted(self.scores, reverse=True)[self.budget - 1]
        return max(self.scores[n] for n in self.frontier) > kth  # a tie goes to the shallower node

    def frontier_row(self) -> tuple[list[int], list[int]]:
        """The frontier's tokens, expanded next after the nodes expanded before them, and every expanded
        node's parent among those (-1: the root): the proposer's row for its next forward (a tree row
        holding only its newest nodes, engine/runner.py)."""
        self.expanded.extend(self.frontier)
        slot = {n: i for i, n in enumerate(self.expanded)}
        return [self.tokens[n] for n in self.frontier], [slot.get(self.parents[n], -1) for n in self.expanded]

    def draft(self) -> tuple[list[int], list[int]]:
        """The draft: the budget best-scored nodes (ties: shallower first), as tokens and parents."""
        order = sorted(range(len(self.tokens)), key=lambda n: (-self.scores[n], self.depths[n], n))[: self.budget]
        index = {n: i for i, n in enumerate(order)}
        return [self.tokens[n] for n in order], [index[self.parents[n]] if self.parents[n] >= 0 else -1
                                                 for n in order]
