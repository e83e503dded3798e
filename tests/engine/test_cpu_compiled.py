"""Compiled CPU decode steps (engine/cpu_compiled.py): the same tokens as transformers with
compiled graphs doing the decode steps (padded batches included), and the eager path kept
whenever a graph is not ready or cannot be built."""

from __future__ import annotations

import pytest
import torch

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
