"""The engine against transformers' greedy output on a tiny random llama, under every scheduling regime:
small token budgets (many prefill chunks), prefix caching, preemption by a tiny KV pool, requests arriving
mid-run; plus batch invariance, prefix-hit accounting, n > 1, seeds, logprobs, stop strings and abort."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from quadrant import SamplingParams  # noqa: E402
from quadrant.engine.engine import LLM, LLMEngine  # noqa: E402

from tests.engine.conftest import GREEDY, make_engine, run_all  # noqa: E402


@pytest.mark.parametrize("regime", ["batched", "small-budget", "no-prefix-cache", "tiny-pool", "mid-run-arrivals",
                                    "one-at-a-time"])
def test_greedy_matches_transformers(tiny, prompts, reference, regime):
    path, _ = tiny
    if regime == "batched":
        engine = make_engine(path)
    elif regime == "small-budget":
        engine = make_engine(path, budget=7)
    elif regime == "no-prefix-cache":
        engine = make_engine(path, prefix=False)
    elif regime == "tiny-pool":
        engine = make_engine(path, num_blocks=30, budget=16)  # 120 slots for ~300 tokens: forces preemption
    elif regime == "mid-run-arrivals":
        engine = make_engine(path, budget=20)
    else:
        engine = make_engine(path, max_num_seqs=1)
    arrivals = [0, 3, 5, 9, 14] if regime == "mid-run-arrivals" else None
    assert run_all(engine, prompts, arrivals=arrivals) == reference
    if regime == "tiny-pool":
        assert engine.scheduler.num_preemptions > 0
    assert engine.kv.pool.num_free == engine.kv.pool.num_blocks  # nothing leaked


def test_prefix_cache_computes_only_new_tokens(tiny, prompts):
    path, _ = tiny
    engine = make_engine(path, block_size=4)
    first, second = prompts[1], prompts[3]  # share 40 tokens = 10 full blocks
    run_all(engine, [first])
    before = engine.num_computed_tokens
    engine.add_request(second, GREEDY, request_id="b")
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    computed = engine.num_computed_tokens - before
    assert outs[-1].num_cached_tokens == 40
    assert computed == len(second) - 40 + GREEDY.max_tokens - 1
    uncached = make_engine(path, prefix=False)
    assert outs[-1].outputs[0].token_ids == run_all(uncached, [second])[0]


def test_n_samples_share_prompt_blocks(tiny):
    path, _ = tiny
    engine = make_engine(path, block_size=4)
    prompt = list(range(1, 42))  # 41 tokens: 10 full blocks
    params = SamplingParams(n=4, max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    engine.add_request(prompt, params, request_id="g")
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    final = outs[-1]
    assert final.finished and len(final.outputs) == 4
    # The prompt ran once, plus each sibling's partial last block and decodes.
    assert engine.num_computed_tokens == 41 + 3 * 1 + 4 * 7
    assert len({tuple(o.token_ids) for o in final.outputs}) > 1  # seeds differ per sample


def test_seed_is_batch_invariant(tiny, prompts):
    path, _ = tiny
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    alone = run_all(make_engine(path), [prompts[2]], params)[0]
    crowd = make_engine(path)
    others = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        crowd.add_request(p, params if i == 2 else others, request_id=str(i))
    results = {}
    while crowd.has_unfinished_requests():
        for o in crowd.step():
            if o.finished:
                results[o.request_id] = o.outputs[0].token_ids
    assert results["2"] == alone


def test_logprobs_match_transformers(tiny, prompts):
    path, hf = tiny
    params = SamplingParams(max_tokens=5, temperature=0.0, logprobs=3, ignore_eos=True)
    out = LLM(path).generate([prompts[0]], params, use_tqdm=False)[0].outputs[0]
    ids = prompts[0] + out.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0], -1)
    for k, rec in enumerate(out.logprobs):
        row = ref[len(prompts[0]) - 1 + k]
        assert rec.token_id == out.token_ids[k]
        assert abs(rec.logprob - row[rec.token_id].item()) < 1e-4
        top = torch.topk(row, 3)
        assert [t for t, _ in rec.top] == top.indices.tolist()


def test_abort_frees_blocks(tiny, prompts):
    path, _ = tiny
    engine = make_engine(path)
    engine.add_request(prompts[4], SamplingParams(max_tokens=100, ignore_eos=True), request_id="x")
    engine.step()
    assert engine.kv.pool.num_free < engine.kv.pool.num_blocks
    assert engine.abort_request("x")
    assert engine.kv.pool.num_free == engine.kv.pool.num_blocks
    assert not engine.has_unfinished_requests() and not engine.abort_request("x")


def test_max_tokens_and_stop_token_ids(tiny, prompts, reference):
    path, _ = tiny
    engine = make_engine(path)
    ref = reference[2]
    stop_at = ref[5]
    first = ref.index(stop_at)
    params = SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=[stop_at], ignore_eos=True)
    engine.add_request(prompts[2], params, request_id="s")
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    o = outs[-1].outputs[0]
    assert o.token_ids == ref[: first + 1] and o.finish_reason == "stop" and o.stop_reason == stop_at
    short = run_all(make_engine(path), [prompts[2]], SamplingParams(max_tokens=3, temperature=0.0))[0]
    assert short == ref[:3]


def test_prompt_validation(tiny):
    path, _ = tiny
    engine = make_engine(path, num_blocks=8, block_size=4)  # 32 slots
    with pytest.raises(ValueError, match="prompt has 40 tokens"):
        engine.add_request(list(range(40)), GREEDY)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], GREEDY)
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request([1, 999], GREEDY)


def test_stream_closes_and_frees(tiny, prompts):
    path, _ = tiny
    engine = make_engine(path)
    stream = engine.stream(prompts[4], SamplingParams(max_tokens=50, ignore_eos=True))
    first = next(stream)
    assert not first.finished and engine.kv.pool.num_free < engine.kv.pool.num_blocks
    stream.close()  # a caller that stops listening (Ctrl-C in chat) aborts the request
    assert engine.kv.pool.num_free == engine.kv.pool.num_blocks and not engine.has_unfinished_requests()


def test_kv_pool_sizing(tiny):
    from quadrant.config import CacheConfig

    path, _ = tiny
    per_block = 2 * 3 * 4 * 2 * 16 * 4  # K and V, 3 layers, 4-token blocks, 2 kv heads, head_dim 16, fp32
    engine = LLMEngine.from_model(path, cache=CacheConfig(block_size=4, kv_cache_memory=per_block * 10))
    assert engine.kv.pool.num_blocks == 10 and engine.max_model_len == 40
    engine = LLMEngine.from_model(path, cache=CacheConfig(block_size=4, memory_fraction=0.01))
    assert engine.kv.pool.num_blocks > 1000  # 1% of this machine's free memory is far more than 10 blocks
    with pytest.raises(ValueError, match="memory_fraction"):
        CacheConfig(memory_fraction=1.5)
