"""Prompt lookup: draft what followed the last occurrence of the sequence's final n-gram.

Copying and editing (summaries quoting their source, code refactors, structured answers) repeat
long runs of the prompt; when the last n tokens appeared before, the tokens after them there are a
free, often right, guess. Tries n from prompt_lookup_max down to prompt_lookup_min; the most recent
earlier occurrence wins (it is likeliest to continue as now). No model, no state between steps.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from quadrant.engine.request import Request
from quadrant.engine.spec.proposer import Drafts
from quadrant.engine.step import Hidden


def lookup(tokens: np.ndarray, k: int, n_min: int, n_max: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of tokens' last n-gram (largest n first)."""
    length = len(tokens)
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        pattern = tokens[length - n :]
        # Windows that start early enough to be followed by at least one token before the pattern itself.
        windows = sliding_window_view(tokens[: length - 1], n)
        hits = np.flatnonzero((windows == pattern).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return tokens[start : start + k].tolist()
    return []


class NgramProposer:
    def __init__(self, n_min: int, n_max: int) -> None:
        self.n_min, self.n_max = n_min, n_max

    def propose(self, asks: list[tuple[Request, int]]) -> Drafts:
        drafts: Drafts = {}
        for req, k in asks:
            found = lookup(np.asarray(req.all_token_ids, dtype=np.int64), k, self.n_min, self.n_max)
            if found:
                drafts[req.request_id] = (found, None)
        return drafts

    def observe(self, hidden: Hidden) -> None:
        pass  # prompt lookup reads tokens only

    def retain(self, live: set[str]) -> None:
        pass  # stateless
