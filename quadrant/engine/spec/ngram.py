"""Prompt lookup: draft what followed the last occurrence of the sequence's final n-gram.

Copying and editing (summaries quoting their source, code refactors, structured answers) repeat
long runs of the prompt; when the last n tokens appeared before, the tokens after them there are a
free, often right, guess. Tries n from prompt_lookup_max down to prompt_lookup_min; the most recent
earlier occurrence wins (it is likeliest to continue as now). No model, no state between steps.

With `branches` > 1 the draft is a token tree (tree.py): the continuations of several earlier
occurrences (longest n first, then most recent), each weighing half the one before, merged into a trie
whose best-weighted nodes fill the request's draft budget.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from quadrant.engine.request import Request
from quadrant.engine.spec.proposer import Draft, Drafts
from quadrant.engine.spec.tree import is_chain, merge_branches
from quadrant.engine.step import Hidden


# Tree drafts: the weight of each further occurrence relative to the one before, and of each node relative
# to its parent (a deep node of the best continuation is worth less than a shallow one of the second).
_BRANCH_WEIGHT, _DEPTH_DECAY = 0.5, 0.8


def lookup(tokens: np.ndarray, k: int, n_min: int, n_max: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of tokens' last n-gram (largest n first)."""
    found = occurrences(tokens, n_min, n_max, 1)
    return tokens[found[0] : found[0] + k].tolist() if found else []


def occurrences(tokens: np.ndarray, n_min: int, n_max: int, limit: int) -> list[int]:
    """Where the continuations of up to `limit` earlier occurrences of tokens' last n-gram start, best
    first: the largest n, then the most recent. Candidates are the earlier places of the last token (one
    vector compare), narrowed one token back at a time: a few microseconds on a 2,000-token sequence,
    where comparing every window per n took ~180."""
    length = len(tokens)
    if length < 2:
        return []
    ends = np.flatnonzero(tokens[: length - 1] == tokens[-1])  # where an occurrence may end
    matched = {1: ends}  # n -> ends of earlier occurrences of the last n tokens
    for n in range(2, min(n_max, length - 1) + 1):
        prev = matched[n - 1]
        prev = prev[prev >= n - 1]
        matched[n] = prev[tokens[prev - (n - 1)] == tokens[length - n]]
    starts: list[int] = []
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        for end in matched[n][::-1].tolist():  # most recent first
            if end + 1 not in starts:  # (an occurrence of n tokens also ends one of n - 1)
                starts.append(end + 1)
                if len(starts) == limit:
                    return starts
    return starts


def lookup_tree(tokens: np.ndarray, k: int, n_min: int, n_max: int, branches: int,
                room: Callable[[int], int] | None = None) -> tuple[list[int], list[int]]:
    """A tree of up to k nodes (tokens, parents) from the continuations of up to `branches` distinct
    earlier occurrences; empty when the last n-gram never occurred before. `room`: the nodes a tree may
    hold given its best continuation's length (where step costs come in steps, the other branches fill
    what that continuation's step costs anyway)."""
    weights: dict[tuple[int, ...], float] = {}
    weight = 1.0
    for start in occurrences(tokens, n_min, n_max, 4 * branches):  # repeats merge: look a little further
        continuation = tuple(tokens[start : start + k].tolist())
        if continuation and (continuation in weights or len(weights) < branches):
            weights[continuation] = weights.get(continuation, 0.0) + weight
        weight *= _BRANCH_WEIGHT
    if not weights:
        return [], []
    budget = k if room is None else max(1, min(k, room(len(next(iter(weights))))))
    return merge_branches([(w, c) for c, w in weights.items()], budget, _DEPTH_DECAY)


class NgramProposer:
    free = True  # a lookup in the request's own tokens
    last_forwards: tuple[float, int] | None = None  # no model

    def __init__(self, n_min: int, n_max: int, branches: int = 1) -> None:
        self.n_min, self.n_max = n_min, n_max
        self.branches = branches
        # Trees: the nodes a request's tree may hold given its best continuation's length (set by the engine
        # where steps run padded graphs); None: the request's whole draft budget.
        self.room: Callable[[int], int] | None = None

    def propose(self, asks: list[tuple[Request, int]]) -> Drafts:
        drafts: Drafts = {}
        for req, k in asks:
            tokens = np.asarray(req.all_token_ids, dtype=np.int64)
            if self.branches > 1 and k > 1:
                found, parents = lookup_tree(tokens, k, self.n_min, self.n_max, self.branches, self.room)
                if found:
                    drafts[req.request_id] = Draft(found, parents=None if is_chain(parents) else parents)
                continue
            found = lookup(tokens, k, self.n_min, self.n_max)
            if found:
                drafts[req.request_id] = Draft(found)
        return drafts

    def observe(self, hidden: Hidden) -> None:
        pass  # prompt lookup reads tokens only

    def retain(self, live: set[str]) -> None:
        pass  # stateless
