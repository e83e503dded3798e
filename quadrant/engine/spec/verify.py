"""Verification of speculative drafts: which proposed tokens the target keeps, losslessly.

Greedy rows keep drafts while they equal the target's own choice at their position; the first
that differs is replaced by the target's token, and when all agree the target adds one more.

Sampled rows use speculative sampling (Leviathan et al. 2023, Chen et al. 2023): a draft x drawn
from q is kept with probability min(1, p(x) / q(x)); the first one rejected is replaced by a draw
from max(p - q, 0), renormalised; when all are kept, a bonus token is drawn from p. An n-gram draft
is certain (q is one-hot on x): kept with probability p(x), else replaced by a draw from p without x.
Either way every output token is distributed exactly as plain sampling would draw it.

A token tree (tree.py) is walked from its root: at each node the target chooses among the node's
children. Greedy keeps the child equal to the target's choice. Sampled trees hold certain drafts (one
per distinct token), tried one after another: child x is kept with probability p(x), else x leaves p,
which is renormalised for the next; when none is kept the token is drawn from what remains of p. Each
outcome keeps exactly p's probability, as with a single certain draft.

p is the target's distribution at that position after every sampling option (logit bias, penalties
counted over the sequence as it would stand there, temperature, top-k, top-p, min-p): the one
layers/sampler.py draws from without speculation. The draft model builds q the same way.
"""

from __future__ import annotations

import torch

from quadrant.engine.spec.tree import children
from quadrant.layers.sampler import SamplingState, adjusted_logits, filter_logits


# `history`: the output as it stands at that position (accepted drafts included), for the penalties.


def distribution(logits: torch.Tensor, req: SamplingState, history: list[int]) -> torch.Tensor | None:
    """The [V] probabilities a sampled (temperature > 0) request draws its next token from; None if unusable."""
    probs = filter_logits(adjusted_logits(logits, req.params, req.prompt_ids, history), req.params).softmax(-1)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        return None
    return probs


def greedy_choice(logits: torch.Tensor, req: SamplingState, history: list[int]) -> int | None:
    row = adjusted_logits(logits, req.params, req.prompt_ids, history)
    token = int(row.argmax())
    return token if bool(torch.isfinite(row[token])) else None


def verify(logits: torch.Tensor, drafts: list[int], draft_probs: torch.Tensor | None, req: SamplingState,
           generator: torch.Generator | None) -> list[int]:
    """logits: [k + 1, V] fp32, the target's at the last token and at each of the k drafts.

    Returns the accepted drafts followed by one token of the target's (1 to k + 1 tokens); empty
    when the target's distribution is not usable (the request then fails, as plain sampling does).
    """
    history = list(req.output_ids)
    tokens: list[int] = []
    gen = req.generator if req.generator is not None else generator
    for j in range(len(drafts) + 1):
        draft = drafts[j] if j < len(drafts) else None
        if req.params.greedy:
            token = greedy_choice(logits[j], req, history)
            if token is None:
                return []
            tokens.append(token)
            if token != draft:
                return tokens
            history.append(token)
            continue
        p = distribution(logits[j], req, history)
        if p is None:
            return []
        if draft is None:  # every draft kept: the bonus token
            tokens.append(int(torch.multinomial(p, 1, generator=gen)))
            return tokens
        q_x = float(draft_probs[j, draft]) if draft_probs is not None else 1.0
        u = float(torch.rand((), generator=gen, device=p.device))
        if u * q_x < float(p[draft]):  # kept with probability min(1, p(x) / q(x))
            tokens.append(draft)
            history.append(draft)
            continue
        if draft_probs is not None:
            residual = (p - draft_probs[j].to(p.dtype)).clamp_(min=0.0)
        else:
            residual = p.clone()
            residual[draft] = 0.0
        if float(residual.sum()) <= 0.0:  # p == q up to rounding: any draw from p is exact
            residual = p
        tokens.append(int(torch.multinomial(residual, 1, generator=gen)))
        return tokens
    raise AssertionError("unreachable: the loop returns at its last position")


def verify_tree(logits: torch.Tensor, tokens: list[int], parents: list[int], req: SamplingState,
                generator: torch.Generator | None) -> tuple[list[int], list[int]]:
    """logits: [n + 1, V] fp32, the target's at the last token (row 0) and at each node (row 1 + i).

    Returns the accepted nodes' tokens followed by one of the target's, and the logits row each was
    chosen at (for its logprobs); empty lists when the target's distribution is not usable.
    """
    history = list(req.output_ids)
    out: list[int] = []
    rows: list[int] = []
    gen = req.generator if req.generator is not None else generator
    node = -1
    while True:
        row = node + 1
        options = children(parents, tokens, node)  # token -> child node
        if req.params.greedy:
            token = greedy_choice(logits[row], req, history)
            if token is None:
                return [], []
        else:
            p = distribution(logits[row], req, history)
            if p is None:
                return [], []
            token = _choose_among(p, list(options), gen)
        out.append(token)
        rows.append(row)
        if token not in options:
            return out, rows
        history.append(token)
        node = options[token]


def _choose_among(p: torch.Tensor, candidates: list[int], gen: torch.Generator | None) -> int:
    """A token distributed as p, trying the certain drafts `candidates` first (each kept with its
    probability under what remains of p)."""
    for x in candidates:
        mass = float(p.sum())
        if mass <= 0.0:
            break
        u = float(torch.rand((), generator=gen, device=p.device))
        if u * mass < float(p[x]):
            return x
        p = p.clone()
        p[x] = 0.0
    if float(p.sum()) <= 0.0:  # every token p allows was a candidate, and each was refused by rounding
        return candidates[-1]
    return int(torch.multinomial(p, 1, generator=gen))
