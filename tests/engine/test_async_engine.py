"""AsyncLLM: streaming from the engine thread, concurrency, abort on early close, failures."""

from __future__ import annotations

import asyncio

import pytest
import torch

from quadrant import SamplingParams
from quadrant.engine.async_engine import AsyncLLM
from tests.engine.conftest import GREEDY, fail_step, make_engine


@pytest.fixture
def allm(tiny):
    a = AsyncLLM(make_engine(tiny[0]))
    yield a
    a.shutdown()


async def collect(allm, prompt, params=GREEDY, rid=None):
    outs = [o async for o in allm.generate(prompt, params, rid)]
    return outs


def test_streams_match_reference_concurrently(allm, prompts, reference):
    async def main():
        return await asyncio.gather(*(collect(allm, p) for p in prompts))

    results = asyncio.run(main())
    for outs, ref in zip(results, reference):
        assert outs[-1].finished and outs[-1].outputs[0].token_ids == ref
        assert sum(len(o.outputs[0].token_ids_delta) for o in outs) == len(ref)  # deltas add up
    assert allm.engine.kv.pool.num_free == allm.engine.kv.pool.num_blocks


def test_closing_a_stream_aborts_and_frees(allm, prompts):
    async def main():
        gen = allm.generate(prompts[4], SamplingParams(max_tokens=200, ignore_eos=True), "long")
        first = await gen.__anext__()
        assert not first.finished
        await gen.aclose()  # what a disconnecting client does
        return await allm.call(lambda e: (e.kv.pool.num_free, e.kv.pool.num_blocks, e.has_unfinished_requests()))

    free, total, busy = asyncio.run(main())
    assert free == total and not busy


def test_bad_request_raises_in_caller(allm):
    async def main():
        with pytest.raises(ValueError, match="empty"):
            await collect(allm, [])
        # The loop still serves others.
        return await collect(allm, [1, 2, 3], SamplingParams(max_tokens=2, temperature=0.0))

    assert asyncio.run(main())[-1].finished


def test_failed_step_fails_its_requests_only(allm, monkeypatch):
    fail_step(monkeypatch, allm.engine.runner, 1)

    async def main():
        with pytest.raises(RuntimeError, match="generation failed: boom"):
            await collect(allm, [5, 6, 7])
        return await collect(allm, [5, 6, 7], SamplingParams(max_tokens=3, temperature=0.0))

    assert asyncio.run(main())[-1].finished
    assert allm.is_running
    assert allm.engine.kv.pool.num_free == allm.engine.kv.pool.num_blocks


def test_one_failing_request_fails_alone(allm, prompts, reference, monkeypatch):
    output = allm.engine.output
    real = output._emit

    def emit(group, now):
        if group.request_id == "bad":
            raise ValueError("detokenizer exploded")
        return real(group, now)

    monkeypatch.setattr(output, "_emit", emit)

    async def main():
        good = asyncio.create_task(collect(allm, prompts[1], rid="good"))
        with pytest.raises(RuntimeError, match="detokenizer exploded"):
            await collect(allm, prompts[2], rid="bad")
        return await good

    outs = asyncio.run(main())
    assert outs[-1].outputs[0].token_ids == reference[1]
    assert allm.engine.kv.pool.num_free == allm.engine.kv.pool.num_blocks


def test_non_finite_logits_fail_only_that_row(allm, prompts):
    from quadrant.engine.step import WorkerRequest
    from quadrant.layers.sampler import sample

    logits = torch.randn(2, 16)
    logits[1] = float("nan")
    sampled = SamplingParams(temperature=1.0)
    tokens, _ = sample(logits, [WorkerRequest(r, [1], [], sampled, None, []) for r in "ab"])
    assert tokens[0] is not None and tokens[1] is None


def test_caller_cancelled_while_adding_leaves_engine_alive(allm, prompts):
    async def main():
        # Cancel many callers at once, some before and some after their add reaches the engine.
        tasks = [asyncio.create_task(collect(allm, prompts[4], SamplingParams(max_tokens=50, ignore_eos=True)))
                 for _ in range(6)]
        await asyncio.sleep(0)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0.5)
        state = await allm.call(lambda e: (e.has_unfinished_requests(), e.kv.pool.num_free == e.kv.pool.num_blocks))
        done = await collect(allm, [1, 2, 3], SamplingParams(max_tokens=2, temperature=0.0))
        return state, done

    (busy, all_free), done = asyncio.run(main())
    assert allm.is_running and not busy and all_free and done[-1].finished
