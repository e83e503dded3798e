"""The multi-process engine (tensor and expert parallelism over gloo, real worker processes) against
the one-process engine on the same checkpoint.

Tolerances. fp32 dense and MoE models: greedy tokens identical and every reported logprob (the
sampled token's and the top 5, i.e. log-softmax of the fp32 logits) within 1e-5: sharded matmuls
and the all-reduce only change the order of fp32 sums (measured: at most 2e-6). Quantised formats
keep the one-process grids under sharding (row-parallel weights are rounded whole, then sliced;
8-bit activations are scaled by their whole row's amax), so w8a8 (fp32 activations, exact int32
GEMMs) is within 1e-5 too (measured: 0). The bf16 kernels (int8, w4a16, w4a8) round each rank's
partial output to bf16 before the sum: the tp=2 vs tp=1 distance of the first token's top logprobs
stays under a quarter of the format's own distance from the dense model (measured: 0.04x-0.16x).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest
import torch

transformers = pytest.importorskip("transformers")

from quadrant import SamplingParams  # noqa: E402
from quadrant.config import CacheConfig, ParallelConfig  # noqa: E402
from quadrant.engine.engine import LLMEngine  # noqa: E402
from quadrant.engine.executor import MultiProcessExecutor, WorkerDiedError  # noqa: E402
from quadrant.parallel.eplb import plan_placement  # noqa: E402
from tests.models.test_moe import _make as make_moe  # noqa: E402
from tests.models.test_vs_transformers import _make_hf as make_dense  # noqa: E402

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=5)
FIRST_TOKEN = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, logprobs=8)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 11, 26, 6)]


def _engine(path, tp: int = 1, ep: int = 1, **options) -> LLMEngine:
    return LLMEngine.from_model(str(path), cache=CacheConfig(block_size=4, num_blocks=96),
                                tensor_parallel_size=tp, expert_parallel_size=ep, **options)


def _generate(engine: LLMEngine, params: SamplingParams) -> list:
    for i, p in enumerate(_prompts()):
        engine.add_request(p, params, request_id=str(i))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.error is None, out.error
            if out.finished:
                done[int(out.request_id)] = out.outputs[0]
    return [done[i] for i in range(len(done))]


def _run(path, tp: int = 1, ep: int = 1, params: SamplingParams = GREEDY, **options):
    engine = _engine(path, tp, ep, **options)
    try:
        outs = _generate(engine, params)
        return outs, engine.expert_load()
    finally:
        engine.shutdown()


def _logprob_distance(a: list, b: list) -> float:
    """Largest difference of a logprob both runs report, over every position of every request."""
    worst = 0.0
    for x, y in zip(a, b):
        for rx, ry in zip(x.logprobs, y.logprobs):
            assert rx.token_id == ry.token_id
            top_y = dict(ry.top)
            worst = max([worst, abs(rx.logprob - ry.logprob)] + [abs(lp - top_y[t]) for t, lp in rx.top if t in top_y])
    return worst


def _assert_same_as_one_process(path, layouts: list[tuple[int, int]]) -> None:
    ref, ref_load = _run(path)
    for tp, ep in layouts:
        outs, load = _run(path, tp, ep)
        assert [o.token_ids for o in outs] == [o.token_ids for o in ref], (tp, ep)
        assert _logprob_distance(outs, ref) < 1e-5, (tp, ep)
        # Routing is replicated fp32 math: the experts saw the same tokens, counted across ranks.
        assert load == ref_load, (tp, ep)


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma3"])
def test_dense_tensor_parallel_matches_one_process(name, tmp_path):
    make_dense(name, tmp_path)
    _assert_same_as_one_process(tmp_path, [(2, 1)])


def test_kv_heads_replicated_when_fewer_than_ranks(tmp_path):
    make_dense("llama", tmp_path)  # 4 query heads, 2 KV heads: at tp=4 each KV head serves two ranks
    _assert_same_as_one_process(tmp_path, [(4, 1)])


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "dots1"])
def test_moe_expert_and_tensor_parallel_match_one_process(name, tmp_path):
    make_moe(name, tmp_path)
    _assert_same_as_one_process(tmp_path, [(1, 2), (2, 2)])


@pytest.fixture(scope="module")
def dense_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_dense("llama", path)
    return path


def _first_token_tops(path, tp: int, weight_format: str) -> list[dict[int, float]]:
    outs, _ = _run(path, tp, params=FIRST_TOKEN, weight_format=weight_format)
    return [dict(o.logprobs[0].top) for o in outs]


def _top_distance(a: list[dict[int, float]], b: list[dict[int, float]]) -> float:
    return max(abs(x[t] - y[t]) for x, y in zip(a, b) for t in x if t in y)


@pytest.mark.parametrize("weight_format", ["int8", "w8a8", "w4a16", "w4a8"])
def test_every_weight_format_runs_sharded(dense_llama, weight_format):
    dense = _first_token_tops(dense_llama, 1, "dense")
    one = _first_token_tops(dense_llama, 1, weight_format)
    two = _first_token_tops(dense_llama, 2, weight_format)
    format_error = _top_distance(dense, one)
    assert format_error > 1e-2  # the format really rounds (else the bounds below say little)
    if weight_format == "w8a8":  # fp32 in and out of exact int32 GEMMs: only fp32 sums reorder
        assert _top_distance(one, two) < 1e-5
    else:  # bf16 kernels: each rank's partial output is rounded to bf16 before the sum
        assert _top_distance(one, two) <= 0.25 * format_error


def test_default_gguf_model_under_tensor_parallel(default_gguf_path):
    """The shipped Q4_1 GGUF (auto plan: 4-bit kernels for decode, bf16 GEMMs for prefill) at tp=3
    (SmolLM2-135M: 9 heads, 3 KV heads) gives the one-process greedy answer."""
    prompt = "The capital of France is"
    params = SamplingParams(max_tokens=12, temperature=0.0)
    texts = []
    for tp in (1, 3):
        engine = LLMEngine.from_model(str(default_gguf_path), tensor_parallel_size=tp)
        try:
            texts.append([o.outputs[0].text for o in engine.stream(prompt, params)][-1])
        finally:
            engine.shutdown()
    assert texts[0] == texts[1] and "Paris" in texts[0]


def test_sizes_that_do_not_divide_fail_before_any_process_starts(dense_llama):
    before = set(psutil.Process().children(recursive=True))
    with pytest.raises(ValueError, match="must divide the model's attention heads"):
        _engine(dense_llama, tp=3)
    with pytest.raises(ValueError, match="dense model"):
        _engine(dense_llama, ep=2)
    with pytest.raises(ValueError, match="several nodes need an agreed --master-port"):
        ParallelConfig(2, nnodes=2)
    assert set(psutil.Process().children(recursive=True)) == before


def test_killed_worker_fails_requests_and_leaves_no_process(dense_llama):
    engine = _engine(dense_llama, tp=2)
    executor = engine.executor
    assert isinstance(executor, MultiProcessExecutor)
    pids = executor.pids
    assert len(pids) == 2
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    os.kill(pids[1], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(WorkerDiedError, match="quadrant-worker-1 exited"):
        for _ in range(50):
            engine.step()
    assert time.monotonic() - start < 10
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    engine.shutdown()  # idempotent after a failure


def _workers(server) -> list[psutil.Process]:
    return [p for p in psutil.Process(server.proc.pid).children(recursive=True)
            if "resource_tracker" not in " ".join(p.cmdline())]


def test_server_with_workers_stops_cleanly_on_sigterm(tmp_path):
    from tests.serve.conftest import start_server

    server = start_server(tmp_path, "--tp", "3")
    workers = _workers(server)
    try:
        assert len(workers) == 3
        r = httpx.post(server.url + "/v1/completions", timeout=120, json={
            "model": "smollm2:135m", "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["text"]
    finally:
        assert server.stop() == 0
    psutil.wait_procs(workers, timeout=10)
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)


def test_server_answers_503_and_exits_when_a_worker_dies(tmp_path):
    from tests.serve.conftest import start_server

    server = start_server(tmp_path, "--tp", "3")
    workers = _workers(server)
    try:
        result = {}

        def long_request():
            result["r"] = httpx.post(server.url + "/v1/completions", timeout=120, json={
                "model": "smollm2:135m", "prompt": "Tell me a story.", "max_tokens": 400, "ignore_eos": True})

        thread = threading.Thread(target=long_request)
        thread.start()
        time.sleep(1.0)  # generating
        workers[-1].kill()
        thread.join(timeout=30)
        assert not thread.is_alive()  # no hang: the request ended within seconds
        assert result["r"].status_code == 503 and result["r"].json()["error"]["code"] == "engine_dead"
        assert server.proc.wait(timeout=30) == 1
    finally:
        server.stop()
    psutil.wait_procs(workers, timeout=10)
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)


def test_workers_exit_when_the_driver_is_killed(dense_llama):
    script = ("import sys, time\nfrom quadrant.engine.engine import LLMEngine\n"
              f"e = LLMEngine.from_model({str(dense_llama)!r}, tensor_parallel_size=2)\n"
              "print('ready', flush=True)\ntime.sleep(600)\n")
    driver = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert driver.stdout is not None and driver.stdout.readline().strip() == "ready"
        workers = [p for p in psutil.Process(driver.pid).children(recursive=True)
                   if "resource_tracker" not in " ".join(p.cmdline())]
        assert len(workers) == 2
        driver.kill()  # SIGKILL: no shutdown code runs in the driver
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive
    finally:
        driver.kill()
        driver.wait()


def test_eplb_rebalance_mid_generation_moves_experts_and_no_token(tmp_path):
    """Mixtral (4 experts) over ep=2 with 2 redundant slots, rebalanced every 3 steps while the
    requests run: the placement follows the load, the outputs stay those of one process."""
    make_moe("mixtral", tmp_path)
    ref, ref_load = _run(tmp_path)
    parallel = ParallelConfig(1, 2, num_redundant_experts=2, eplb_interval=3)
    engine = LLMEngine.from_model(str(tmp_path), cache=CacheConfig(block_size=4, num_blocks=96), parallel=parallel)
    try:
        initial = plan_placement([0] * 4, 2, 3)
        outs = _generate(engine, GREEDY)
        assert engine.num_steps >= 6  # several rebalances happened during generation
        placements = engine.expert_placement
        assert placements and any(p != initial for p in placements.values())
        for placement in placements.values():
            assert sorted(set(placement)) == [0, 1, 2, 3] and len(placement) == 6
        assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
        assert _logprob_distance(outs, ref) < 1e-5
        assert engine.expert_load() == ref_load
    finally:
        engine.shutdown()


def test_plan_placement_gives_hot_experts_the_spare_slots():
    load = [1000, 10, 10, 400, 10, 10]
    placement = plan_placement(load, num_ranks=2, slots_per_rank=4)
    assert len(placement) == 8 and sorted(set(placement)) == list(range(6))
    assert placement.count(0) == 2 and placement.count(3) == 2  # the two hot experts are copied
    for rank in range(2):
        mine = placement[rank * 4 : (rank + 1) * 4]
        assert len(set(mine)) == 4  # no rank holds two copies of one expert
    share = {e: (load[e] + 1) / placement.count(e) for e in range(6)}
    rank_load = [sum(share[e] for e in placement[r * 4 : (r + 1) * 4]) for r in range(2)]
    assert max(rank_load) / min(rank_load) < 1.1


def test_two_nodes_join_one_rendezvous(dense_llama):
    """Node 1 (another `quadrant` process, as on a second machine) starts only its worker and joins
    node 0's rendezvous; the engine on node 0 then runs as at tp=2 on one node."""
    from tests.serve.conftest import free_port

    port = free_port()
    node1 = subprocess.Popen([sys.executable, "-m", "quadrant", "run", str(dense_llama), "unused", "--tp", "2",
                              "--nnodes", "2", "--node-rank", "1", "--master-port", str(port), "--dtype", "float32"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        parallel = ParallelConfig(2, nnodes=2, master_port=port)
        engine = LLMEngine.from_model(str(dense_llama), cache=CacheConfig(block_size=4, num_blocks=96),
                                      parallel=parallel)
        try:
            assert isinstance(engine.executor, MultiProcessExecutor) and len(engine.executor.pids) == 1
            outs = _generate(engine, GREEDY)
        finally:
            engine.shutdown()
        assert node1.wait(timeout=30) == 0, node1.stdout.read() if node1.stdout else ""
    finally:
        node1.kill()
        node1.wait()
    ref, _ = _run(dense_llama)
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    assert _logprob_distance(outs, ref) < 1e-5


def test_quantised_experts_split_over_ranks_match_one_process(tmp_path):
    """w8a8 experts packed per rank (the loader skips the other rank's experts after repacking):
    ep=2 gives the one-process logits (exact int32 GEMMs, the same tokens per expert)."""
    make_moe("mixtral", tmp_path)
    one = _first_token_tops(tmp_path, 1, "w8a8")
    outs, _ = _run(tmp_path, 1, 2, params=FIRST_TOKEN, weight_format="w8a8")
    assert _top_distance(one, [dict(o.logprobs[0].top) for o in outs]) < 1e-5


def test_a_reply_left_by_an_interrupted_call_is_skipped(dense_llama):
    engine = _engine(dense_llama, tp=2)
    try:
        executor = engine.executor
        assert isinstance(executor, MultiProcessExecutor)
        executor._conn.send(("expert_load", (), -1))  # as if a caller had been interrupted before its reply
        out = _generate(engine, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
        assert [len(o.token_ids) for o in out] == [3, 3, 3, 3]
    finally:
        engine.shutdown()


def test_options_the_workers_cannot_honour_are_refused_up_front(dense_llama):
    with pytest.raises(ValueError, match="--eplb-interval moves float expert weights"):
        LLMEngine.from_model(str(dense_llama), weight_format="w8a8",
                             parallel=ParallelConfig(1, 2, eplb_interval=10))
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        LLMEngine.from_model(str(dense_llama), device="cuda:1", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="give the parallel sizes once"):
        LLMEngine.from_model(str(dense_llama), tensor_parallel_size=2, parallel=ParallelConfig(2))
