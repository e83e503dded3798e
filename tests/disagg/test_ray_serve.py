"""Elastic prefill and decode pools on Ray Serve: the scaling rule on its own, then a real local Ray
cluster (2 CPUs) serving a tiny random llama, whose decode pool grows under load and shrinks after."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from quadrant import SamplingParams
from quadrant.config import CacheConfig, SchedulerConfig
from quadrant.disagg.autoscale import PoolSignals, PoolTargets, desired_replicas, pool_signals, proposals
from tests.serve.conftest import free_port
from tests.tiny_models import save_tiny_llama

# ray_serve.py sets metrics_interval_s on purpose: Ray 2.60 marks it deprecated but still reads it.
pytestmark = pytest.mark.filterwarnings("ignore:The `metrics_interval_s` field:DeprecationWarning")

# -- the scaling rule -----------------------------------------------------------------------------

DECODE = PoolTargets(min_replicas=1, max_replicas=8, target_kv_usage=0.5, tpot_slo=0.1)
PREFILL = PoolTargets(min_replicas=1, max_replicas=8, target_waiting=2.0, ttft_slo=1.0)


def test_each_signal_proposes_its_proportional_count():
    assert proposals(2, PoolSignals(kv_usage=0.9, tpot=0.05), DECODE) == {"kv_usage": 4, "tpot": 1}
    assert proposals(3, PoolSignals(num_waiting=5.0, ttft=0.5), PREFILL) == {"num_waiting": 8, "ttft": 2}
    # A pool only reads its own signals: decode ignores queue depth, prefill KV usage.
    assert desired_replicas(2, PoolSignals(num_waiting=100.0), DECODE) == 1
    assert desired_replicas(2, PoolSignals(kv_usage=1.0), PREFILL) == 1


def test_the_largest_proposal_wins_within_bounds():
    assert desired_replicas(2, PoolSignals(kv_usage=0.75, tpot=0.3), DECODE) == 6  # TPOT 3x its SLO beats KV 1.5x
    assert desired_replicas(2, PoolSignals(kv_usage=1.0, tpot=0.9), DECODE) == 8  # 18 clamped to max
    assert desired_replicas(4, PoolSignals(), DECODE) == 1  # idle: down to min
    assert desired_replicas(3, PoolSignals(kv_usage=0.25, tpot=0.02), DECODE) == 2  # ceil(3 * 0.5)
    assert desired_replicas(0, PoolSignals(kv_usage=1.0), DECODE) == 1  # nothing running: the floor


def test_tolerance_band_holds_the_count():
    assert desired_replicas(4, PoolSignals(kv_usage=0.53), DECODE) == 4  # 6% over target
    assert desired_replicas(4, PoolSignals(kv_usage=0.47), DECODE) == 4  # 6% under
    assert desired_replicas(4, PoolSignals(kv_usage=0.58), DECODE) == 5  # 16% over: ceil(4.64)
    assert desired_replicas(4, PoolSignals(kv_usage=0.42), DECODE) == 4  # 16% under: ceil(3.36)
    assert desired_replicas(4, PoolSignals(kv_usage=0.36), DECODE) == 3
    assert desired_replicas(2, PoolSignals(kv_usage=1.0), PoolTargets(1, 8, target_kv_usage=0.5, tolerance=0.0)) == 4


def test_targets_check_themselves():
    for bad in (dict(min_replicas=0), dict(min_replicas=3, max_replicas=2), dict(target_kv_usage=1.5),
                dict(ttft_slo=0.0), dict(tolerance=1.0)):
        with pytest.raises(ValueError):
            PoolTargets(**bad)
    assert PoolTargets.for_role("prefill", 1, 2).target_waiting is not None
    assert PoolTargets.for_role("decode", 1, 4).target_kv_usage is not None


def test_pool_signals_average_the_replicas_and_count_the_queue_as_waiting():
    reports = {"kv_usage": {"a": 0.2, "b": 0.6}, "tpot": {"a": 0.05}, "num_waiting": {"a": 3.0, "b": 1.0}}
    signals = pool_signals(reports, num_replicas=2, num_queued=4.0)
    assert signals == PoolSignals(num_waiting=4.0, kv_usage=0.4, ttft=0.0, tpot=0.05)
    assert pool_signals({}, num_replicas=0, num_queued=None) == PoolSignals()


# -- a local Ray cluster --------------------------------------------------------------------------

PROMPT = [1, 7, 42, 99, 5, 64, 3, 18]
AUTH = {"Authorization": "Bearer sesame"}  # the router asks clients for it and sends it to the pools
ENGINE = dict(cache=CacheConfig(block_size=16, num_blocks=64),
              scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=512))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    pytest.importorskip("zmq")
    from quadrant.disagg.ray_serve import PoolConfig, RayDisaggConfig, deploy

    path = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_llama(path, hidden_size=64, intermediate_size=128, num_layers=2, max_positions=512)
    # Decode follows KV usage alone here (the TPOT of 2 shared CPUs says nothing): six long requests
    # fill the 64-block cache, well past 30%.
    decode = PoolConfig(PoolTargets(min_replicas=1, max_replicas=2, target_kv_usage=0.3), num_cpus=0.5,
                        upscale_delay_s=1.0, downscale_delay_s=3.0, drain_timeout_s=10.0)
    prefill = PoolConfig(PoolTargets.for_role("prefill", 1, 1), num_cpus=0.5)
    config = RayDisaggConfig(model=str(path), engine_kwargs=ENGINE, prefill=prefill, decode=decode,
                             port=free_port(), served_model_name="tiny", api_key="sesame", kv_host="127.0.0.1",
                             metrics_interval_s=0.5, look_back_period_s=2.0, router_num_cpus=0.25)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        deploy(config)
        yield config
    finally:
        serve.shutdown()
        ray.shutdown()
    assert not ray.is_initialized()
    with pytest.raises(httpx.ConnectError):  # the proxy is gone with its port
        httpx.get(f"http://127.0.0.1:{config.port}/health", timeout=5)


def url(config, path: str) -> str:
    return f"http://127.0.0.1:{config.port}{path}"


def complete(config, **body) -> dict:
    r = httpx.post(url(config, "/v1/completions"), timeout=120, headers=AUTH,
                   json={"model": "tiny", "prompt": PROMPT, "temperature": 0, "return_token_ids": True, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_greedy_completion_through_the_proxy_equals_the_engine(cluster):
    from quadrant.disagg.ray_serve import running_replicas
    from quadrant.engine.engine import LLMEngine

    assert httpx.get(url(cluster, "/health")).json()["status"] == "ok"
    assert httpx.get(url(cluster, "/decode/health"), headers=AUTH).status_code == 200  # a pool behind its prefix
    assert httpx.post(url(cluster, "/v1/completions"), json={"model": "tiny", "prompt": PROMPT}).status_code == 401
    assert (running_replicas("prefill"), running_replicas("decode")) == (1, 1)
    got = complete(cluster, max_tokens=32, ignore_eos=True)["choices"][0]["token_ids"]
    engine = LLMEngine.from_model(cluster.model, **ENGINE)
    engine.add_request(PROMPT, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True), request_id="0")
    want = None
    while want is None:
        want = next((out.outputs[0].token_ids for out in engine.step() if out.finished), None)
    assert got == want and len(got) == 32
    # The prompt's KV came from the prefill pool (one pull), not recomputed by the decode replica.
    assert 'quadrant_kv_transfer{what="transfers"} 1.0' in httpx.get(url(cluster, "/decode/metrics"), headers=AUTH).text


def test_decode_pool_scales_up_under_load_and_back_down(cluster):
    from quadrant.disagg.ray_serve import running_replicas

    stop = threading.Event()

    def load() -> list[int]:
        statuses = []
        while not stop.is_set():
            r = httpx.post(url(cluster, "/v1/completions"), timeout=120, headers=AUTH,
                           json={"model": "tiny", "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True})
            statuses.append(r.status_code)
        return statuses

    with ThreadPoolExecutor(6) as pool:
        clients = [pool.submit(load) for _ in range(6)]
        try:
            assert _wait_until(lambda: running_replicas("decode") == 2, timeout=60), "the decode pool never grew"
        finally:
            stop.set()
        statuses = [s for c in clients for s in c.result()]
    assert statuses and set(statuses) == {200}  # nothing was lost while the pool grew
    assert _wait_until(lambda: running_replicas("decode") == 1, timeout=45), "the decode pool never shrank"
    assert running_replicas("prefill") == 1
    assert len(complete(cluster, max_tokens=8, ignore_eos=True)["choices"][0]["token_ids"]) == 8  # one replica serves


def _wait_until(condition, timeout: float, poll: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(poll)
    return False
