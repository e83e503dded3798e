"""Token sampling for a batch of requests, each with its own SamplingParams.

Per row: logit bias and penalties, then greedy argmax, or temperature, top-k,
top-p and min-p filtering and a draw from the row's own torch.Generator, so a
seeded request gives the same tokens whatever else shares its batch. Logprobs
are those of the model's raw distribution (before any of the above).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from quadrant.sampling_params import SamplingParams


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the top_logprobs most likely (token id, logprob), best first


class SamplingState(Protocol):
    """What sampling reads of a sequence: its options, its tokens (for penalties) and its generator."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator | None


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits: [V] fp32 -> temperature-scaled logits with filtered entries at -inf."""
    logits = logits / params.temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (the first one always stays).
        drop_sorted = probs.cumsum(-1) - probs >= params.top_p
        logits = logits.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    """logits: [V] fp32 -> logits with logit_bias and repetition/presence/frequency penalties applied."""
    logits = logits.clone()
    if params.logit_bias:
        keys = [i for i in params.logit_bias if i < logits.shape[0]]  # host lists: no device round trip
        ids = torch.tensor(keys, dtype=torch.long, device=logits.device)
        logits[ids] += torch.tensor([params.logit_bias[i] for i in keys], dtype=logits.dtype, device=logits.device)
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long, device=logits.device)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and output_ids:
        counts = torch.bincount(torch.tensor(output_ids, dtype=torch.long, device=logits.device),
                                minlength=logits.shape[0]).to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def adjusted_logits(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int],
                    output_ids: list[int]) -> torch.Tensor:
    """logits: [V] -> with logit bias and penalties applied (the same tensor when the request has none)."""
    if params.logit_bias or params.uses_penalties:
        return apply_penalties(logits, params, prompt_ids, output_ids)
    return logits


def sample(logits: torch.Tensor, requests: Sequence[SamplingState], default_generator: torch.Generator | None = None,
           allowed: torch.Tensor | None = None) -> tuple[list[int | None], list[TokenLogprob | None]]:
    """logits: [B, V] fp32, one row per request -> (token ids, logprob records or None).

    Every row is decided on the logits' device and the ids come back in one host copy, so a
    GPU step synchronises once. A row whose sampling fails (its logits are not finite) gets
    None: that request fails, the rest of the batch goes on. `allowed` [B, V] bool (structured
    outputs) limits each row's choice, greedy rows included; a row it leaves no token fails.
    """
    raw = logits
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    chosen = logits.argmax(-1)  # [B]
    finite = torch.isfinite(logits.gather(1, chosen[:, None])).squeeze(1)
    chosen = torch.where(finite, chosen, -1)  # a row whose best logit is not finite fails, on the device
    for i, req in enumerate(requests):
        p = req.params
        if p.greedy and not (p.logit_bias or p.uses_penalties):
            continue
        chosen[i] = _sample_row(logits[i], req, default_generator)
    tokens: list[int | None] = [t if t >= 0 else None for t in chosen.tolist()]
    records: list[TokenLogprob | None] = [None] * len(requests)
    wanted = [i for i, r in enumerate(requests) if r.params.logprobs is not None and tokens[i] is not None]
    if wanted:
        found = logprob_records(raw[wanted], [tokens[i] for i in wanted],  # type: ignore[misc]
                                [requests[i].params.logprobs or 0 for i in wanted])
        for i, record in zip(wanted, found):
            records[i] = record
    return tokens, records


def logprob_records(logits: torch.Tensor, tokens: Sequence[int], num_top: Sequence[int]) -> list[TokenLogprob]:
    """logits: [N, V] fp32 raw -> each row's record of its token and its num_top best alternatives."""
    logp = torch.log_softmax(logits, dim=-1)
    records = []
    for row, (token, k) in enumerate(zip(tokens, num_top)):
        top = torch.topk(logp[row], k) if k else None
        records.append(TokenLogprob(
            token_id=token,
            logprob=float(logp[row, token]),
            top=list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else [],
        ))
    return records


def _sample_row(logits: torch.Tensor, req: SamplingState, default_generator: torch.Generator | None) -> torch.Tensor:
    """The row's token as a 0-d device tensor; -1 if its distribution is not usable (no host sync)."""
    p = req.params
    row = adjusted_logits(logits, p, req.prompt_ids, req.output_ids)
    if p.greedy:
        token = row.argmax()
        return torch.where(torch.isfinite(row[token]), token, -1)
    probs = filter_logits(row, p).softmax(-1)
    # Checked on the device: on CUDA a bad distribution would be a device-side assert, not an exception.
    usable = torch.isfinite(probs).all() & (probs.sum() > 0)
    probs = torch.where(usable, probs, torch.ones_like(probs))
    gen = req.generator if req.generator is not None else default_generator
    return torch.where(usable, torch.multinomial(probs, 1, generator=gen)[0], -1)
