"""Compiled CPU decode steps (engine/cpu_compiled.py): the same tokens as transformers with
compiled graphs doing the decode steps (padded batches included), and the eager path kept
whenever a graph is not ready or cannot be built."""

from __future__ import annotations

import pytest
import torch

from quadrant import SamplingParams
from quadrant.config import SpeculativeConfig
from quadrant.engine.cpu_compiled import CompiledDecode, compile_available
from tests.engine.conftest import make_engine, run_all


@pytest.fixture
def compiling(monkeypatch):
    monkeypatch.setenv("QUADRANT_CPU_COMPILE", "1")  # tests/conftest.py turns it off for the others
    if not compile_available():
        pytest.skip("no C++ compiler for inductor here")


def count_compiled_steps(runner) -> list[int]:
    """Wrap the runner's compiled path: the batch sizes of the steps it ran."""
    ran: list[int] = []
    run = runner.compiled.run

    def counted(input_ids, *rest):
        hidden = run(input_ids, *rest)
        if hidden is not None:
            ran.append(len(input_ids))
        return hidden

    runner.compiled.run = counted
    return ran


def test_compiled_decode_matches_transformers(tiny, prompts, reference, compiling):
    # Three rows at most: graphs for 1, 2 and 4 rows, so a three-row step runs padded to four.
    engine = make_engine(tiny[0], max_num_seqs=3)
    runner = engine.runner
    assert runner.compiled is not None and runner.compiled.sizes == [1, 2, 4]
    assert engine.compile_decode([1, 2, 3])
    ran = count_compiled_steps(runner)
    assert run_all(engine, prompts) == reference
    assert {2, 3} <= set(ran)  # padded (3 -> 4) and unpadded graphs both decoded


def test_compiled_hidden_states_match_eager(tiny, compiling):
    """A padded three-row decode step, compiled against the same function run eagerly, fp32: 1e-5."""
    engine = make_engine(tiny[0], max_num_seqs=4)
    runner = engine.runner
    assert engine.compile_decode([3])
    g = torch.Generator().manual_seed(0)
    for kv in runner.kv_caches:  # cached context to attend to
        kv.k.copy_(torch.randn(kv.k.shape, generator=g))
        kv.v.copy_(torch.randn(kv.v.shape, generator=g))
    bs = runner.block_size
    tables, positions = [[1, 2, 3], [4, 5], [6]], [9, 5, 2]
    slots = [t[p // bs] * bs + p % bs for t, p in zip(tables, positions)]
    step = ([5, 7, 9], positions, slots, [p + 1 for p in positions], tables)
    compiled = runner.compiled.run(*step)
    assert compiled is not None and compiled.shape[0] == 3
    with torch.inference_mode():
        eager = runner.compiled._forward(*runner.compiled._inputs(*step, 4))[:3]
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_verification_steps_run_through_the_decode_graphs(tiny, compiling):
    """Speculative verification on CPU: each of a row's 1 + k tokens a decode row of the compiled
    graph. A lone request drafting 3 tokens per step (prompt lookup on a repeated phrase) gives
    transformers' greedy tokens with its verification steps run at 4 rows."""
    from tests.engine.conftest import hf_greedy

    phrase = [5, 17, 99, 3, 250, 42, 7, 8]
    prompt = phrase * 5
    engine = make_engine(tiny[0], max_num_seqs=1, speculative=SpeculativeConfig("ngram", 3, draft_cost=0.0))
    assert engine.runner.compiled is not None and engine.runner.compiled.sizes == [1, 2, 4]
    assert engine.compile_decode([1, 4])
    ran = count_compiled_steps(engine.runner)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    assert run_all(engine, [prompt], params) == [hf_greedy(tiny[1], prompt, 24)]
    assert engine.spec_stats.num_verifications > 0
    assert 4 in ran  # verification steps (1 + 3 tokens) ran compiled
    assert set(engine.runner.compiled.seconds) >= {4}  # and were timed for the policy


def test_token_tree_verification_runs_through_the_decode_graphs(tiny, prompts, reference, compiling):
    """Token trees on CPU: each tree token a decode row of the compiled graph, masked to its ancestors.
    Trees whose accepted path always lies off the first branch (tests/engine/test_spec_trees.py) give
    transformers' greedy tokens, verified compiled, their K/V moved to a chain's slots every time."""
    from tests.engine.test_spec_trees import oracle_engine

    engine = oracle_engine(tiny[0], prompts[:1], reference[:1], max_num_seqs=1)
    assert engine.compile_decode([1, 8])
    ran = count_compiled_steps(engine.runner)
    moves, execute = [], engine.runner.execute
    engine.runner.execute = lambda step: (moves.append(len(step.kv_moves)), execute(step))[1]
    assert run_all(engine, prompts[:1]) == reference[:1]
    stats = engine.spec_stats
    assert stats.num_tree_verifications == stats.num_verifications > 3
    assert sum(n >= 5 for n in ran) >= 3 and sum(moves) > 3  # tree steps of 5+ rows ran compiled


def test_compiled_step_costs_follow_measured_times():
    """The policy's cost model: a prior of 1 + 0.25 per padded row until a graph is timed (its first
    real step left out: a warm-up), then the graph's measured time (the lower quartile of its latest
    timings) over the one-row graph's, and the
    eager ratio past the largest graph."""
    compiled = CompiledDecode(object(), 4, 10, 16)
    compiled.ready = {1, 2, 4, 8, 16}
    assert compiled.step_cost(3) == pytest.approx(1.75)  # padded to 4 rows
    for rows, seconds in ((1, 0.5), (5, 0.5), (1, 0.010), (5, 0.030)):  # the first of each graph: a warm-up
        compiled.record(rows, seconds)
    assert compiled.step_cost(6) == pytest.approx(3.0)  # 8-row graph: 30 ms against 10
    assert compiled.step_cost(17) == pytest.approx(2.5 * (1 + 0.25 * 16))
    compiled.ready = {1}
    assert compiled.step_cost(2) == pytest.approx(2.5 * 1.25)  # no graph yet: eager
    # Only verification steps so far (a lone request drafting at every step): the one-row step's time is
    # inferred from the smallest measured graph, so drafting gets priced from the first propose call on.
    fresh = CompiledDecode(object(), 4, 10, 16)
    fresh.ready = {1, 2, 4, 8, 16}
    assert fresh.one_row_seconds() is None
    for rows, seconds in ((4, 1.0), (8, 1.0), (4, 0.020), (8, 0.050)):
        fresh.record(rows, seconds)
    assert fresh.one_row_seconds() == pytest.approx(0.020 / 1.75)
    assert fresh.step_cost(7) == pytest.approx(0.050 / (0.020 / 1.75))
    assert fresh.wants_one_row_step()  # so the engine runs one plain step for a lone request
    fresh.record(1, 1.0)
    fresh.record(1, 0.010)
    assert fresh.one_row_seconds() == 0.010 and fresh.wants_one_row_step()  # one timing is not enough
    for seconds in (0.011, 0.012, 0.010):
        fresh.record(1, seconds)
    assert fresh.one_row_seconds() == 0.010 and not fresh.wants_one_row_step()
    for _ in range(65):
        fresh.record(4, 0.020)
    assert fresh.wants_one_row_step()  # measured again now and then
    # A graph's time is the lower quartile of its 16 latest timings: slow outliers (other load, the
    # process's first steps) do not raise it, and a lasting change replaces it.
    for seconds in (0.030, 0.025, 0.040):
        fresh.record(1, seconds)
    assert fresh.one_row_seconds() == 0.010
    for _ in range(10):
        fresh.record(1, 0.020)
    assert fresh.one_row_seconds() == 0.020  # 16 timings: the 4th fastest (the VM slowed down for good)


def test_a_graph_that_cannot_build_leaves_the_eager_path(tiny, prompts, reference, compiling, monkeypatch):
    def broken(self, *args):
        raise RuntimeError("this model does not trace")

    monkeypatch.setattr(CompiledDecode, "_forward", broken)
    engine = make_engine(tiny[0], max_num_seqs=2)
    assert not engine.compile_decode([1])
    assert engine.runner.compiled is not None and engine.runner.compiled.failed
    assert run_all(engine, prompts) == reference


def test_enforce_eager_and_quantised_caches_compile_nothing(tiny, compiling):
    assert make_engine(tiny[0], cpu_compile=False).runner.compiled is None
    assert make_engine(tiny[0], cache_dtype="int8").runner.compiled is None
