"""Sampling statistics against the exact filtered distribution (chi-square), penalties against their
formulas, and SamplingParams validation."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from quadrant import SamplingParams
from quadrant.engine.step import WorkerRequest
from quadrant.layers.sampler import apply_penalties, filter_logits, sample

LOGITS = torch.tensor([2.0, 1.5, 1.2, 0.9, 0.5, 0.1, -0.3, -1.0, -2.0, -3.0])


def exact_probs(params: SamplingParams) -> torch.Tensor:
    """The distribution each setting should sample from, computed directly from its definition."""
    p = torch.softmax(LOGITS / params.temperature, -1)
    order = p.argsort(descending=True)
    keep = torch.ones_like(p, dtype=torch.bool)
    if params.top_k > 0:
        keep[order[params.top_k:]] = False
    if params.top_p < 1.0:
        q = p.clone()
        q[~keep] = 0
        q = q / q.sum()
        mass = 0.0
        for i in q.argsort(descending=True).tolist():
            if mass >= params.top_p:
                keep[i] = False
            mass += q[i].item()
    if params.min_p > 0:
        q = p.clone()
        q[~keep] = 0
        q = q / q.sum()
        keep &= q >= params.min_p * q.max()
    p = torch.where(keep, p, torch.zeros_like(p))
    return p / p.sum()


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.5),
    SamplingParams(temperature=1.3, top_k=4),
    SamplingParams(temperature=1.0, top_p=0.7),
    SamplingParams(temperature=0.8, min_p=0.15),
    SamplingParams(temperature=1.0, top_k=6, top_p=0.9, min_p=0.05),
], ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}")
def test_sampling_distribution_chi_square(params):
    draws = 20_000
    req = WorkerRequest("r", [0], [], params, torch.Generator().manual_seed(0), [])
    logits = LOGITS.expand(draws, -1).contiguous()
    tokens, _ = sample(logits, [req] * draws)
    expected = exact_probs(params)
    counts = torch.bincount(torch.tensor(tokens), minlength=10).double()
    assert counts[expected == 0].sum() == 0  # filtered tokens never drawn
    support = expected > 0
    # p > 0.001: a correct sampler fails this one time in a thousand.
    f_exp = expected[support].double()
    f_exp = f_exp / f_exp.sum() * counts.sum()
    assert chisquare(counts[support].numpy(), f_exp.numpy()).pvalue > 1e-3


def test_filter_logits_matches_exact_support():
    params = SamplingParams(temperature=1.0, top_k=5, top_p=0.8)
    kept = torch.isfinite(filter_logits(LOGITS, params))
    assert torch.equal(kept, exact_probs(params) > 0)


def test_penalties_follow_their_formulas():
    logits = torch.tensor([1.0, -1.0, 2.0, 0.5])
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0, logit_bias={3: 1.5})
    got = apply_penalties(logits, p, prompt_ids=[1], output_ids=[2, 2, 0])
    # repetition on tokens 0, 1, 2 (prompt or output); then presence + frequency on outputs 0 (x1), 2 (x2).
    want = torch.tensor([1.0 / 2 - 0.5 - 0.25, -1.0 * 2, 2.0 / 2 - 0.5 - 0.5, 0.5 + 1.5])
    assert torch.allclose(got, want)


def test_greedy_with_bias_takes_biased_argmax():
    req = WorkerRequest("r", [0], [], SamplingParams(temperature=0.0, logit_bias={9: 100.0}), None, [])
    assert sample(LOGITS[None], [req])[0] == [9]


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("min_p", 2.0), ("max_tokens", -1),
    ("n", 0), ("presence_penalty", 3.0), ("frequency_penalty", -2.5), ("repetition_penalty", 0.0),
    ("logprobs", 21), ("seed", "x"), ("stop", [""]), ("stop_token_ids", [-1]), ("logit_bias", {1: 500.0}),
    ("temperature", "hot"), ("max_tokens", 1.5), ("prompt_logprobs", 21), ("pooling", "max"),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}"):
        SamplingParams(**{field: value})
