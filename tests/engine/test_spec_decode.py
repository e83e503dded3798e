"""Speculative decoding against plain decoding and transformers: greedy output identical for every
proposer (dense, MoE, under preemption and tight budgets), draft = target accepting everything,
speculative sampling distributed exactly as the target (chi-square, unit and end to end), finish
rules and logprobs unchanged, n-gram drafting on repetitive text and backing off on adversarial
text, blocks freed on abort."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

transformers = pytest.importorskip("transformers")

from quadrant import SamplingParams  # noqa: E402
from quadrant.config import SpeculativeConfig  # noqa: E402
from quadrant.engine.request import Request  # noqa: E402
from quadrant.engine.spec.ngram import lookup  # noqa: E402
from quadrant.engine.spec.policy import SpeculationPolicy, expected_tokens  # noqa: E402
from quadrant.engine.spec.proposer import SpecStats  # noqa: E402
from quadrant.engine.spec.verify import verify  # noqa: E402
from quadrant.engine.step import WorkerRequest  # noqa: E402
from quadrant.layers.sampler import apply_penalties, filter_logits  # noqa: E402

from tests.engine.conftest import hf_greedy, make_engine, run_all  # noqa: E402

# draft_cost 0: drafting always pays, so these speculate every step (the policy is tested on its own).
NGRAM = SpeculativeConfig("ngram", 4, draft_cost=0.0)
DRAFT_SELF = SpeculativeConfig("draft", 4, draft_cost=0.0)  # the target as its own draft
DRAFT_CUT = SpeculativeConfig("draft", 3, draft_layers=1, draft_cost=0.0)  # the target's first layer: often wrong


@pytest.fixture(scope="module")
def spec_prompts(prompts):
    """The engine prompts plus one that repeats a phrase (prompt lookup drafts from it)."""
    phrase = [5, 17, 99, 3, 250, 42, 7, 8]
    return [*prompts, phrase * 5]


@pytest.fixture(scope="module")
def spec_reference(tiny, spec_prompts):
    return [hf_greedy(tiny[1], p, 24) for p in spec_prompts]


GREEDY24 = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("spec", [NGRAM, DRAFT_SELF, DRAFT_CUT], ids=["ngram", "draft-self", "draft-1-layer"])
@pytest.mark.parametrize("regime", ["batched", "tiny-pool", "small-budget"])
def test_greedy_identical_with_every_proposer(tiny, spec_prompts, spec_reference, spec, regime):
    path, _ = tiny
    options = {"batched": {}, "tiny-pool": {"num_blocks": 30, "budget": 16}, "small-budget": {"budget": 7}}[regime]
    engine = make_engine(path, speculative=spec, **options)
    assert run_all(engine, spec_prompts, GREEDY24) == spec_reference
    stats = engine.spec_stats
    assert stats.num_verifications > 0 and stats.num_draft_tokens > 0
    if spec is DRAFT_SELF:
        assert stats.num_accepted_tokens == stats.num_draft_tokens
    if regime == "tiny-pool":
        assert engine.scheduler.num_preemptions > 0
    assert engine.kv.pool.num_free == engine.kv.pool.num_blocks  # nothing leaked
    if spec.method == "draft":
        engine.proposer.retain(set())
        assert len(engine.proposer.free_blocks) == engine.kv.pool.num_blocks


@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_triton_backend_verifies_identically(tiny, spec_prompts, spec_reference, graphs):
    """Verification rows through the Triton attention kernels (interpreted on CPU: kept short): with CUDA
    graphs, each of a row's 1 + k tokens a decode row of the graphs' padded buffers (off CUDA they run
    eagerly); without, the varlen kernel over multi-token rows."""
    path, _ = tiny
    prompts = [spec_prompts[0], spec_prompts[-1]]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    engine = make_engine(path, attention_backend="triton", cuda_graphs=graphs,
                         speculative=SpeculativeConfig("draft", 3, draft_cost=0.0))
    ran: list[int] = []
    if graphs:
        run = engine.runner.graphs.run
        engine.runner.graphs.run = lambda ids, *rest: (ran.append(len(ids)), run(ids, *rest))[1]
    assert run_all(engine, prompts, params) == [spec_reference[0][:10], spec_reference[-1][:10]]
    assert engine.spec_stats.num_accepted_tokens > 0
    assert (max(ran, default=0) > len(prompts)) == graphs  # verification steps: more rows than requests


def test_int8_kv_cache_greedy_identical(tiny, spec_prompts):
    """With an 8-bit cache a rejected draft's write requantises its scale group; verified tokens are
    rewritten and the group's scale re-derived from the tokens before them, so output stays that of
    plain decoding with the same cache."""
    path, _ = tiny
    plain = run_all(make_engine(path, cache_dtype="int8", quant_group=4), spec_prompts, GREEDY24)
    engine = make_engine(path, cache_dtype="int8", quant_group=4, speculative=NGRAM)
    assert run_all(engine, spec_prompts, GREEDY24) == plain
    assert engine.spec_stats.num_verifications > 0


def test_draft_equal_to_target_accepts_every_token(tiny, prompts):
    """K drafts from the target itself: acceptance rate exactly 1 and length exactly K + 1. max_tokens
    is 1 + 6 (K + 1), so every verification can take all K drafts and none is cut short."""
    path, model = tiny
    k = 3
    params = SamplingParams(max_tokens=1 + 6 * (k + 1), temperature=0.0, ignore_eos=True)
    engine = make_engine(path, speculative=SpeculativeConfig("draft", k, draft_cost=0.0))  # always K drafts
    assert run_all(engine, prompts, params) == [hf_greedy(model, p, params.max_tokens) for p in prompts]
    stats = engine.spec_stats
    assert stats.num_verifications == 6 * len(prompts)
    assert stats.acceptance_rate == 1.0
    assert stats.acceptance_length == k + 1


def test_moe_greedy_identical(tmp_path):
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=256)
    transformers.MixtralForCausalLM(config).save_pretrained(tmp_path, safe_serialization=True)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 23)] + [[9, 8, 7, 6, 5] * 6]
    plain = run_all(make_engine(str(tmp_path)), prompts, GREEDY24)
    for spec in (NGRAM, DRAFT_SELF, SpeculativeConfig("draft", 2, draft_layers=1, draft_cost=0.0)):
        engine = make_engine(str(tmp_path), speculative=spec)
        assert run_all(engine, prompts, GREEDY24) == plain, spec
        assert engine.spec_stats.num_draft_tokens > 0


# -- sampling: the output is distributed as the target's ------------------------------------------
def _draws_of_verify(p_logits: torch.Tensor, q: torch.Tensor | None, draws: int, seed: int = 0) -> torch.Tensor:
    """Run verify() `draws` times on fixed target logits [3, V] with 2 drafts: drawn from q [2, V], or
    certain (n-gram: always tokens 0 and 1). Returns the first two output tokens [draws, 2]; when only one
    came out, the second is what the next step would draw (logits that do not depend on the history:
    position 2's)."""
    gen = torch.Generator().manual_seed(seed)
    params = SamplingParams(temperature=1.0)
    req = WorkerRequest("r", [0], [], params, gen, [])
    out = torch.empty((draws, 2), dtype=torch.long)
    for i in range(draws):
        drafts = [int(torch.multinomial(q[j], 1, generator=gen)) for j in range(2)] if q is not None else [0, 1]
        tokens = verify(p_logits, drafts, q, req, None)
        assert 1 <= len(tokens) <= 3
        if len(tokens) == 1:
            tokens.append(int(torch.multinomial(p_logits[1].softmax(-1), 1, generator=gen)))
        out[i] = torch.tensor(tokens[:2])
    return out


@pytest.mark.parametrize("drafts", ["model", "certain"])
def test_verify_is_distributed_as_the_target(drafts):
    """The first two tokens out of verification, jointly, against the target's own p1 x p2 (the fixed
    logits do not depend on the history). p > 0.001: a correct verifier fails this one time in a thousand."""
    vocab, draws = 5, 12_000
    p_logits = torch.tensor([[1.0, 0.2, -0.5, 0.7, 0.0], [0.1, 1.2, 0.3, -1.0, 0.5], [0.0, 0.0, 0.0, 0.0, 0.0]])
    q = torch.tensor([[0.1, 0.5, 0.1, 0.2, 0.1], [0.3, 0.1, 0.4, 0.1, 0.1]]) if drafts == "model" else None
    out = _draws_of_verify(p_logits, q, draws)
    p = p_logits.softmax(-1)
    joint = (p[0][:, None] * p[1][None, :]).flatten().double()
    joint /= joint.sum()
    counts = torch.bincount(out[:, 0] * vocab + out[:, 1], minlength=vocab * vocab).double()
    assert chisquare(counts.numpy(), (joint * draws).numpy()).pvalue > 1e-3


def _exact_marginal(model, prompt: list[int], params: SamplingParams, steps: int) -> dict[tuple[int, ...], float]:
    """P(first `steps` tokens) under the target with every sampling option, by enumerating the support
    (transformers' logits, quadrant's filters, which tests/layers/test_sampler.py checks on their own)."""
    dist: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(steps):
        nxt: dict[tuple[int, ...], float] = {}
        for seq, mass in dist.items():
            with torch.no_grad():
                logits = model(torch.tensor([prompt + list(seq)])).logits[0, -1].float()
            row = apply_penalties(logits, params, prompt, list(seq))
            probs = filter_logits(row, params).softmax(-1)
            for t in torch.nonzero(probs).flatten().tolist():
                nxt[seq + (t,)] = mass * float(probs[t])
        dist = nxt
    return dist


def test_speculative_sampling_matches_target_distribution_end_to_end(tiny):
    """2048 samples of 4 tokens through the engine with a 1-layer draft (often rejected, so the
    residual draws matter), top-k, top-p and a repetition penalty; the 4-token sequences' frequencies
    against their exact probabilities (rare ones pooled)."""
    check_sampled_distribution(tiny, SpeculativeConfig("draft", 2, draft_layers=1, max_batch_size=4096,
                                                       draft_cost=0.0))  # never backs off


def check_sampled_distribution(tiny, spec: SpeculativeConfig) -> SpecStats:
    path, model = tiny
    prompt = [11, 200, 37, 5, 90]
    params = SamplingParams(n=128, max_tokens=4, temperature=0.9, top_k=4, top_p=0.95, repetition_penalty=1.3,
                            ignore_eos=True)
    engine = make_engine(path, num_blocks=4096, max_num_seqs=256, speculative=spec)
    for i in range(16):
        engine.add_request(prompt, params, request_id=str(i))
    counts: dict[tuple[int, ...], int] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                for c in out.outputs:
                    counts[tuple(c.token_ids)] = counts.get(tuple(c.token_ids), 0) + 1
    stats = engine.spec_stats
    assert stats.num_verifications > 500 and 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    exact = _exact_marginal(model, prompt, params, 4)
    assert set(counts) <= set(exact)  # nothing outside the filtered support
    total = sum(counts.values())
    common = sorted(s for s, pr in exact.items() if pr * total >= 5)
    observed = [counts.get(s, 0) for s in common]
    expected = [exact[s] * total for s in common]
    observed.append(total - sum(observed))
    expected.append(total - sum(expected))
    assert chisquare(observed, expected).pvalue > 1e-3
    return stats


def test_seeded_sampling_is_reproducible_with_speculation(tiny, prompts):
    path, _ = tiny
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=7, ignore_eos=True)
    runs = [run_all(make_engine(path, speculative=DRAFT_CUT), prompts[:3], params) for _ in range(2)]
    assert runs[0] == runs[1]


# -- what callers see: finish reasons, stop tokens, logprobs -----------------------------------------
def test_stop_tokens_max_tokens_and_logprobs_unchanged(tiny, spec_prompts, spec_reference):
    """A stop token inside an accepted run of drafts ends the request there, as one-token steps would;
    logprob records match plain decoding's (the verifying rows' logits, within float tolerance)."""
    path, _ = tiny
    i = len(spec_prompts) - 1
    stop = spec_reference[i][9]  # stops at its first occurrence
    first = spec_reference[i].index(stop)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop_token_ids=[stop], logprobs=2)
    plain_engine, spec_engine = make_engine(path), make_engine(path, speculative=DRAFT_SELF)
    results = []
    for engine in (plain_engine, spec_engine):
        engine.add_request(spec_prompts[i], params, request_id="s")
        engine.add_request(spec_prompts[0], SamplingParams(max_tokens=13, temperature=0.0, ignore_eos=True,
                                                           logprobs=1), request_id="m")
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0]
        results.append(done)
    plain, spec = results
    assert spec["s"].token_ids == plain["s"].token_ids == spec_reference[i][: first + 1]
    assert spec["s"].finish_reason == "stop" and spec["s"].stop_reason == stop
    assert len(spec["m"].token_ids) == 13 and spec["m"].finish_reason == plain["m"].finish_reason == "length"
    for rid in ("s", "m"):
        assert len(spec[rid].logprobs) == len(spec[rid].token_ids)
        for a, b in zip(spec[rid].logprobs, plain[rid].logprobs):
            assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-4
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
    assert spec_engine.spec_stats.num_accepted_tokens > 0


def test_abort_mid_run_frees_every_block(tiny, prompts):
    path, _ = tiny
    engine = make_engine(path, speculative=DRAFT_SELF)
    for i, p in enumerate(prompts):
        engine.add_request(p, GREEDY24, request_id=str(i))
    for _ in range(3):
        engine.step()
    assert engine.spec_stats.num_verifications > 0
    assert len(engine.proposer.free_blocks) < engine.kv.pool.num_blocks  # the draft's cache holds them too
    for i in range(len(prompts)):
        engine.abort_request(str(i))
    engine.step()
    assert engine.kv.pool.num_free == engine.kv.pool.num_blocks
    assert len(engine.proposer.free_blocks) == engine.kv.pool.num_blocks


# -- n-gram drafting and the back-off policy ---------------------------------------------------------
def test_ngram_lookup_takes_the_latest_longest_match():
    import numpy as np

    seq = np.array([1, 2, 3, 4, 9, 1, 2, 3, 5, 6, 7, 2, 3])
    assert lookup(seq, 3, 2, 4) == [5, 6, 7]  # "2 3" last seen before "5 6 7"
    assert lookup(np.array([1, 2, 3, 1, 2, 3]), 4, 2, 3) == [1, 2, 3]  # what follows may overlap the end
    assert lookup(np.array([4, 5, 6, 7]), 3, 1, 3) == []


def test_ngram_lookup_matches_a_scan_of_every_window():
    """The lookup narrows the last token's earlier places one token back at a time; the reference
    compares every window of each length (what it did before), on 2,000 random short sequences over
    small vocabularies (many repeats)."""
    import numpy as np
    from numpy.lib.stride_tricks import sliding_window_view

    def scan(tokens: np.ndarray, k: int, n_min: int, n_max: int) -> list[int]:
        for n in range(min(n_max, len(tokens) - 1), n_min - 1, -1):
            hits = np.flatnonzero((sliding_window_view(tokens[:-1], n) == tokens[len(tokens) - n:]).all(axis=1))
            if len(hits):
                return tokens[int(hits[-1]) + n:int(hits[-1]) + n + k].tolist()
        return []

    rng = np.random.default_rng(0)
    for _ in range(2000):
        tokens = rng.integers(0, int(rng.integers(2, 6)), size=int(rng.integers(1, 60)))
        k, n_min = int(rng.integers(1, 8)), int(rng.integers(1, 4))
        n_max = n_min + int(rng.integers(0, 4))
        assert lookup(tokens, k, n_min, n_max) == scan(tokens, k, n_min, n_max)


def test_ngram_drafts_and_accepts_on_copied_text(default_gguf_path):
    """The default model asked to copy a list: prompt lookup drafts from it, most drafts are accepted,
    and the text, finish reason and stop string handling are those of plain decoding."""
    from quadrant.engine.engine import LLM

    items = "apple, banana, cherry, date, elderberry, fig, grape, honeydew, kiwi, lemon, mango, nectarine"
    prompt = f"The list: {items}. The same list again: apple, banana, cherry,"
    params = SamplingParams(max_tokens=48, temperature=0.0, stop=["nectarine"])
    llms = [LLM(str(default_gguf_path), weight_format="dense", **options)  # fp32: see test_speculative_server
            for options in ({}, {"speculative_method": "ngram", "num_speculative_tokens": 4})]
    plain, spec = (llm.generate(prompt, params, use_tqdm=False)[0].outputs[0] for llm in llms)
    stats = llms[1].engine.spec_stats
    assert stats.num_accepted_tokens >= 10 and stats.acceptance_length > 2.0, stats
    assert "kiwi, lemon, mango" in spec.text
    assert (spec.text, spec.token_ids, spec.finish_reason, spec.stop_reason) == \
        (plain.text, plain.token_ids, plain.finish_reason, plain.stop_reason)


def test_ngram_backs_off_on_an_adversarial_prompt(tiny):
    """Every token of the vocabulary appears in the prompt, each always followed by the same one, so
    unigram lookup always drafts; the model does not follow: it must stop trying."""
    path, _ = tiny
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(5)).tolist()
    prompt = perm + perm[:200]
    engine = make_engine(path, num_blocks=512, speculative=SpeculativeConfig("ngram", 4, prompt_lookup_min=1))
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    assert run_all(engine, [prompt], params) == run_all(make_engine(path, num_blocks=512), [prompt], params)
    stats = engine.spec_stats
    assert stats.num_backoffs >= 2
    assert stats.num_verifications < 20  # of 47 decoding steps: speculation paused for most of them
    assert stats.acceptance_rate < 0.25


def test_policy_drafts_what_pays_and_pauses_longer_on_every_repeat():
    policy = SpeculationPolicy(SpeculativeConfig("ngram", 4), max_model_len=100, draft_cost=0.25)
    req = Request("r", list(range(10)), SamplingParams(max_tokens=40))
    first = policy.plan([req])["r"]
    assert 0 < first < 4  # a new request's prior (a = 1/2) does not pay for 4 drafts at cost 0.25
    for _ in range(5):
        assert not policy.record("r", 4, 4)
    assert policy.plan([req]) == {"r": 4}  # everything accepted: the longest row pays best
    pauses = []
    for _ in range(3):
        while not policy.record("r", 4, 0):
            pass
        n = 0
        while not policy.plan([req]):
            n += 1
        pauses.append(n)
    assert pauses == [4, 8, 16]
    assert expected_tokens(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    req.output_ids = [1] * 38  # two tokens left: one verification adds at most k + 1
    policy.states.clear()
    assert policy.plan([req]) == {"r": 1}
    policy.retain(set())
    assert not policy.states


def test_policy_drafts_less_as_the_batch_grows():
    """Goodput-greedy: with well-accepted drafts (a = 0.8) a lone request drafts the most; in a batch
    of 16 each extra token costs a quarter step for 0.8 tokens, less than the batch already makes."""
    policy = SpeculationPolicy(SpeculativeConfig("ngram", 4), max_model_len=1000, draft_cost=0.25)
    requests = [Request(str(i), list(range(10)), SamplingParams(max_tokens=100)) for i in range(16)]
    for r in requests:
        for _ in range(10):
            policy.record(r.request_id, 4, 3)  # three of four accepted, one rejection per verification
    drafted = [sum(policy.plan(requests[:b]).values()) / b for b in (1, 2, 4, 16)]
    assert drafted[0] >= 2 and drafted == sorted(drafted, reverse=True) and drafted[-1] == 0
    capped = SpeculationPolicy(SpeculativeConfig("ngram", 4), 1000, draft_cost=0.0, max_step_tokens=16)
    assert sum(capped.plan(requests[:12]).values()) == 4  # a CPU step stays within the compact kernels' 16 rows


def test_policy_plans_over_a_staircase_of_compiled_step_costs():
    """Compiled CPU graphs pad a step to 1, 2, 4, 8 or 16 rows, so 5 tokens cost what 8 do: a well-
    accepted lone request capped at 7 drafts fills the 8-row graph, where stopping at the first draft
    that does not pay would halt at 3; a new request (a = 1/2) fills the 4-row graph (one draft alone
    does not pay: 1.5 tokens for 1.6 steps); with eager verification nothing pays."""
    times = {1: 1.0, 2: 1.6, 4: 1.8, 8: 2.9, 16: 3.2}
    req = Request("r", list(range(10)), SamplingParams(max_tokens=200))
    policy = SpeculationPolicy(SpeculativeConfig("ngram", 15), 1000, draft_cost=0.25)
    policy.step_cost = lambda n: times[next(s for s in times if s >= n)] if n <= 16 else 2.5 * (1 + 0.25 * (n - 1))
    assert policy.plan([req]) == {"r": 3}  # 1.875 tokens for 1.8 steps
    policy.states["r"].accepted, policy.states["r"].rejected = 60.0, 0.5  # a long, well-accepted history
    assert policy.plan([req])["r"] == 15  # ~16 tokens for 3.2 steps
    capped = SpeculationPolicy(SpeculativeConfig("ngram", 7), 1000, draft_cost=0.25)
    capped.step_cost = policy.step_cost
    capped.states["r"] = policy.states["r"]
    assert capped.plan([req])["r"] == 7  # not 3: the 8-row graph costs the same for 5 to 8 tokens
    eager = SpeculationPolicy(SpeculativeConfig("ngram", 4), 1000, draft_cost=0.25)
    eager.step_cost = lambda n: 1.0 if n == 1 else 2.5 * (1 + 0.25 * (n - 1))  # verification eager
    assert eager.record("r", 4, 4)  # 5 tokens for 2.5 x 2 = 5 steps: never more than plain decode


def test_policy_prices_the_proposers_own_forwards():
    """A model proposer's chain of k drafts is k forwards: measured at a third of a step each, a well-
    accepted request (a = 0.9) drafts a shorter chain than for free, and at a whole step each (a draft
    model as costly as the target) it stops drafting and backs off, until steps without drafts have
    forgotten enough of that cost to measure it again."""
    req = Request("r", list(range(10)), SamplingParams(max_tokens=200))
    plans, costs = [], []
    for seconds_per_forward in (0.0, 0.003, 0.01):
        policy = SpeculationPolicy(SpeculativeConfig("draft", 7), 1000, draft_cost=0.1)
        policy.plan([req])  # the request's state, then a well-accepted history
        policy.states["r"].accepted, policy.states["r"].rejected = 9.0, 1.0
        if seconds_per_forward:
            policy.observe_drafting(seconds_per_forward * 4, forwards=4, step_seconds=0.01)
        costs.append(policy.forward_cost)
        plans.append(policy.plan([req]).get("r", 0))
    assert costs == pytest.approx([0.0, 0.3, 1.0])
    assert plans[0] == 7 and 0 < plans[1] < 7 and plans[2] == 0
    assert policy.forward_cost == pytest.approx(0.995)  # the plan that drafted nothing forgot 0.5%
    assert policy.record("r", 1, 1)  # even an accepted draft does not repay a whole step's forward
    policy.observe_drafting(0.0, forwards=2, step_seconds=0.01)  # decayed, not replaced
    assert policy.forward_cost == pytest.approx(0.8 * 0.995)
    policy.states["r"].accepted, policy.states["r"].rejected = 9.0, 1.0
    policy.states["r"].paused_steps, policy.forward_cost = 0, 2.0  # a reading from a busy moment
    steps = 0
    while not policy.plan([req]):  # forgotten a little at each step that drafts nothing: it drafts again
        steps += 1
    assert 100 < steps < 400


def test_free_guesses_start_drafting():
    """Where a new request's prior (a = 1/2) does not pay for a verification, a free proposer's
    unverified guesses, checked against the sampled tokens, are the evidence: hits start the drafting,
    misses keep it off, and a paused request keeps its pause."""
    times = {1: 1.0, 2: 2.0, 4: 1.9, 8: 3.2}
    policy = SpeculationPolicy(SpeculativeConfig("ngram", 7), 1000, draft_cost=0.25)
    policy.step_cost = lambda n: times[next(s for s in times if s >= n)]
    req = Request("r", list(range(10)), SamplingParams(max_tokens=200))
    assert policy.plan([req]) == {}
    for _ in range(3):
        policy.record_shadow("r", False)
    assert policy.plan([req]) == {}
    for _ in range(8):
        policy.record_shadow("r", True)
    assert policy.plan([req])["r"] >= 3
    while not policy.record("r", 7, 0):
        pass
    paused = policy.states["r"].paused_steps
    for _ in range(8):
        policy.record_shadow("r", True)
    assert policy.states["r"].paused_steps == paused and policy.plan([req]) == {}


def test_large_batches_do_not_speculate(tiny, prompts):
    path, _ = tiny
    engine = make_engine(path, speculative=SpeculativeConfig("draft", 2, max_batch_size=2, draft_cost=0.0))
    run_all(engine, prompts, GREEDY24)
    assert engine.spec_stats.num_large_batch_steps > 0


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "eagle"}, "eagle needs --speculative-model"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "model": "x"}, "needs --speculative-method draft or eagle"),
    ({"method": "ngram", "draft_layers": 2}, "need --speculative-method draft"),
    ({"method": "draft", "draft_layers": 0}, "draft_layers"),
])
def test_bad_speculative_settings_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig(**kwargs)


def test_draft_model_must_share_the_vocabulary(tiny, tmp_path):
    from tests.tiny_models import save_tiny_llama

    other = tmp_path / "other"
    save_tiny_llama(other, hidden_size=32, intermediate_size=64, num_layers=1)
    cfg = (other / "config.json").read_text().replace('"vocab_size": 256', '"vocab_size": 300')
    (other / "config.json").write_text(cfg)
    with pytest.raises(ValueError, match="share a tokenizer"):
        make_engine(tiny[0], speculative=SpeculativeConfig("draft", 2, model=str(other)))
