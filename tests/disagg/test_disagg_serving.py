"""Prefill and decode workers as real `quadrant serve --role ...` processes on loopback, with the
default model, and the router in front of one prefill and two decode workers: the KV of a prompt
moves between them over the KV transport, the answers equal a colocated server's, and a decode
worker killed during 16 concurrent streams loses none of them.

Workers run dense fp32 weights (`--weight-format dense`): a stream resumed after a kill recomputes
its tokens so far as a prompt, and only with one precision for prompts and decode steps is the
greedy continuation of a recomputed prompt the same as of a decoded one.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.disagg.test_router import metric, start_router, stop_router
from tests.serve.conftest import free_port, start_server

pytest.importorskip("zmq")

DENSE = ("--weight-format", "dense")

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a quiet village by the sea,"]


@pytest.fixture(scope="module")
def workers(default_gguf_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("disagg")
    roles = [("--role", "prefill", "--kv-port", str(free_port()), "--kv-lease-seconds", "6"), ("--role", "decode"),
             ("--role", "decode"), ()]
    with ThreadPoolExecutor(4) as pool:  # four processes on two cores: one thread each
        servers = list(pool.map(lambda r: start_server(tmp, *DENSE, *r, env={"OMP_NUM_THREADS": "1"}), roles))
    prefill, decode, decode2, colocated = servers
    router = start_router(tmp, [prefill], [decode, decode2], "--health-interval", "0.5", "--request-timeout", "5")
    yield prefill, decode, colocated, decode2, router
    stop_router(router)
    for s in servers:
        s.stop()


def wait_until(cond, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.25)


def completion(url: str, body: dict) -> dict:
    r = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def decode_like_colocated(prefill, decode, colocated) -> None:
    """Each prompt prefilled on `prefill`, its KV decoded on `decode`: the colocated server's text."""
    for prompt in PROMPTS:
        body = {"model": "smollm2:135m", "prompt": prompt, "max_tokens": 16, "temperature": 0}
        first = completion(prefill.url, {**body, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}})
        got = completion(decode.url, {**body, "kv_transfer_params": first["kv_transfer_params"]})
        assert got["choices"][0]["text"] == completion(colocated.url, body)["choices"][0]["text"]


def test_prefill_then_decode_equals_colocated(workers):
    prefill, decode, colocated = workers[:3]
    for prompt in PROMPTS:
        body = {"model": "smollm2:135m", "prompt": prompt, "max_tokens": 24, "temperature": 0}
        first = completion(prefill.url, {**body, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}})
        kv = first["kv_transfer_params"]
        assert kv["num_tokens"] == first["usage"]["prompt_tokens"] and kv["remote_block_ids"]
        got = completion(decode.url, {**body, "kv_transfer_params": kv})
        want = completion(colocated.url, body)
        assert got["choices"][0]["text"] == want["choices"][0]["text"] and got["usage"] == want["usage"]
    metrics = httpx.get(decode.url + "/metrics").text
    assert 'quadrant_kv_transfer{what="transfers"} 3.0' in metrics
    # Every lease was released by the decode side's done.
    assert 'quadrant_kv_transfer{what="active_leases"} 0.0' in httpx.get(prefill.url + "/metrics").text


def test_mooncake_transport_between_worker_processes(workers, tmp_path):
    """--kv-transport mooncake between real worker processes (the engine tests share one process):
    the decode worker reads the prompt's blocks from the prefill worker's registered cache."""
    try:
        from mooncake.engine import TransferEngine  # noqa: F401
    except ImportError as e:  # the package, or its libibverbs (scripts/install.sh test installs both)
        pytest.skip(f"Mooncake Transfer Engine not installed here: {e}")
    colocated = workers[2]
    roles = [("--role", "prefill", "--kv-port", str(free_port()), "--kv-transport", "mooncake"),
             ("--role", "decode", "--kv-transport", "mooncake")]
    with ThreadPoolExecutor(2) as pool:
        prefill, decode = pool.map(lambda r: start_server(tmp_path, *DENSE, *r, env={"OMP_NUM_THREADS": "1"}), roles)
    try:
        decode_like_colocated(prefill, decode, colocated)
        assert 'quadrant_kv_transfer{what="transfers"} 3.0' in httpx.get(decode.url + "/metrics").text
        assert 'quadrant_kv_transfer{what="failures"} 0.0' in httpx.get(decode.url + "/metrics").text
        assert 'quadrant_kv_transfer{what="active_leases"} 0.0' in httpx.get(prefill.url + "/metrics").text
    finally:
        prefill.stop()
        decode.stop()


def test_prefill_worker_with_tensor_parallel_processes(workers, tmp_path):
    """`--role prefill --tp 3` (SmolLM2-135M: 9 heads, 3 KV heads; three worker processes): its blocks,
    joined from the ranks' head shards, decode on the one-process decode worker as a colocated server
    answers."""
    decode, colocated = workers[1], workers[2]
    prefill = start_server(tmp_path, *DENSE, "--role", "prefill", "--tp", "3", env={"OMP_NUM_THREADS": "1"})
    try:
        decode_like_colocated(prefill, decode, colocated)
        metrics = httpx.get(prefill.url + "/metrics").text
        assert 'quadrant_kv_transfer{what="active_leases"} 0.0' in metrics  # every copy released
        assert 'quadrant_kv_transfer{what="leases_released"} 3.0' in metrics
    finally:
        prefill.stop()


def test_streamed_decode_with_token_ids(workers):
    prefill, decode, colocated = workers[:3]
    body = {"model": "smollm2:135m", "messages": [{"role": "user", "content": "Name three colours."}],
            "max_tokens": 20, "temperature": 0}
    r = httpx.post(prefill.url + "/v1/chat/completions",
                   json={**body, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}, timeout=120)
    kv = r.json()["kv_transfer_params"]
    chunks = []
    with httpx.stream("POST", decode.url + "/v1/chat/completions", timeout=120,
                      json={**body, "stream": True, "kv_transfer_params": kv, "return_token_ids": True}) as s:
        for line in s.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    assert chunks[0]["prompt_token_ids"] and len(chunks[0]["prompt_token_ids"]) == kv["num_tokens"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    ids = [t for c in chunks for t in c["choices"][0]["token_ids"]]
    want = httpx.post(colocated.url + "/v1/chat/completions", json={**body, "return_token_ids": True},
                      timeout=120).json()
    assert text == want["choices"][0]["message"]["content"]
    assert ids == want["choices"][0]["token_ids"]


def test_bad_kv_transfer_params_are_a_400(workers):
    prefill, decode, _ = workers[:3]
    body = {"model": "smollm2:135m", "prompt": PROMPTS[0], "max_tokens": 4}
    r = httpx.post(decode.url + "/v1/completions", json={**body, "kv_transfer_params": {"transfer_id": "x"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "kv_transfer_params"
    kv = completion(prefill.url, {**body, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}})
    r = httpx.post(decode.url + "/v1/completions",
                   json={**body, "prompt": PROMPTS[1], "kv_transfer_params": kv["kv_transfer_params"]})
    assert r.status_code == 400 and "another prompt" in r.json()["error"]["message"]
    r = httpx.post(prefill.url + "/v1/completions",
                   json={**body, "n": 2, "kv_transfer_params": {"do_remote_decode": True}})
    assert r.status_code == 400
    assert httpx.get(decode.url + "/health").status_code == 200


def test_overlapped_prefill_refused_by_the_prefill_worker_is_computed_by_the_decode_worker(workers):
    """The router sent the decode worker the transfer id; the prefill worker turned the prompt away (here:
    n = 2): the decode worker's parked pulls are refused at once and it computes the prompt itself."""
    prefill, decode, colocated = workers[:3]
    body = {"model": "smollm2:135m", "prompt": PROMPTS[2], "max_tokens": 12, "temperature": 0}
    transfer_id = uuid.uuid4().hex
    kv_host, kv_port = httpx.get(prefill.url + "/health").json()["kv"].values()
    failures = metric(decode.url, "quadrant_kv_transfer", what="failures")
    with ThreadPoolExecutor(1) as pool:
        start = time.monotonic()
        pending = pool.submit(completion, decode.url, {**body, "kv_transfer_params": {
            "transfer_id": transfer_id, "remote_host": kv_host, "remote_port": kv_port}})
        refused = httpx.post(prefill.url + "/v1/completions", json={**body, "n": 2, "max_tokens": 1, "kv_transfer_params": {
            "do_remote_decode": True, "transfer_id": transfer_id}})
        assert refused.status_code == 400
        got = pending.result(timeout=60)
    assert time.monotonic() - start < 8  # not the 10 s a pull waits for a transfer its server never heard of
    assert got["choices"][0]["text"] == completion(colocated.url, body)["choices"][0]["text"]
    assert metric(decode.url, "quadrant_kv_transfer", what="failures") == failures + 1


def test_router_without_overlap_equals_colocated(workers, tmp_path):
    """--no-kv-overlap: the decode step starts when the prefill step has answered (the transfer is named
    by the prefill worker)."""
    prefill, decode, colocated = workers[:3]
    router = start_router(tmp_path, [prefill], [decode], "--no-kv-overlap")
    try:
        early = metric(prefill.url, "quadrant_kv_transfer", what="early_reads")
        body = {"model": "smollm2:135m", "prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0}
        assert completion(router.url, body)["choices"][0]["text"] == \
            completion(colocated.url, body)["choices"][0]["text"]
        assert metric(prefill.url, "quadrant_kv_transfer", what="early_reads") == early
    finally:
        stop_router(router)


def test_overlapped_prefill_on_a_dead_worker_is_computed_by_the_decode_worker(workers, tmp_path):
    """The router still believes in a prefill worker that was killed (no health check since): the prefill
    step fails, the decode worker's pull finds nobody there within seconds and computes the prompt
    itself, exactly; the router marks the worker unhealthy."""
    decode, colocated = workers[1], workers[2]
    victim = start_server(tmp_path, *DENSE, "--role", "prefill", env={"OMP_NUM_THREADS": "1"})
    router = start_router(tmp_path, [victim], [decode], "--health-interval", "600")
    try:
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(timeout=10)
        failures = metric(decode.url, "quadrant_kv_transfer", what="failures")
        body = {"model": "smollm2:135m", "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0}
        got = completion(router.url, body)
        assert got["choices"][0]["text"] == completion(colocated.url, body)["choices"][0]["text"]
        assert metric(decode.url, "quadrant_kv_transfer", what="failures") == failures + 1
        (state,) = [w for w in httpx.get(router.url + "/workers").json()["data"] if w["role"] == "prefill"]
        assert not state["healthy"] and state["last_error"]
    finally:
        stop_router(router)
        victim.stop()


async def _stream(client: httpx.AsyncClient, url: str, body: dict, progress: list[int], i: int) -> dict:
    text, finish, usage = "", None, None
    async with client.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk["choices"]:
                text += c["text"]
                finish = c["finish_reason"] or finish
                progress[i] += 1
    return {"text": text, "finish_reason": finish, "usage": usage}


def test_router_streams_survive_a_decode_worker_killed(workers):
    """16 concurrent streams through the router over two decode workers; one worker is killed once every
    stream has relayed a few tokens; every stream completes with exactly the colocated server's text."""
    prefill, decode, colocated, decode2, router = workers
    prompts = [f"Write item {i} of a numbered list of fruits and their colours:" for i in range(16)]
    bodies = [{"model": "smollm2:135m", "prompt": p, "max_tokens": 32, "temperature": 0, "ignore_eos": True,
               "stream": True, "stream_options": {"include_usage": True}} for p in prompts]
    want = [completion(colocated.url, {**b, "stream": False, "stream_options": None}) for b in bodies]

    async def run() -> list[dict]:
        progress = [0] * len(bodies)
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=32)) as client:
            tasks = [asyncio.create_task(_stream(client, router.url, b, progress, i)) for i, b in enumerate(bodies)]
            while min(progress) < 3 and not all(t.done() for t in tasks):
                await asyncio.sleep(0.02)
            decode2.proc.send_signal(signal.SIGKILL)
            return list(await asyncio.gather(*tasks))

    early = metric(prefill.url, "quadrant_kv_transfer", what="early_reads")
    got = asyncio.run(run())
    for g, w in zip(got, want):
        assert g["text"] == w["choices"][0]["text"]
        assert g["finish_reason"] == "length" and g["usage"]["completion_tokens"] == 32
    assert metric(router.url, "quadrant_router_resumed_streams_total") > 0
    # The router sent each prompt to both pools at once: layers were pulled while their prompt was computed.
    assert metric(prefill.url, "quadrant_kv_transfer", what="early_reads") > early


def test_router_crash_and_restart_leak_nothing(workers, tmp_path):
    """The router is killed with streams in flight: the decode worker aborts them, unpulled leases expire on
    the prefill worker, no block stays in use; a new router on the same workers serves at once."""
    prefill, decode, colocated = workers[:3]
    router = start_router(tmp_path, [prefill], [decode], "--health-interval", "0.5")
    body = {"model": "smollm2:135m", "prompt": "List the planets of the solar system:", "max_tokens": 64,
            "temperature": 0, "ignore_eos": True, "stream": True}

    async def crash() -> None:
        async with httpx.AsyncClient() as client:
            tasks = [asyncio.create_task(_stream(client, router.url, {**body, "prompt": f"{i}. " + body["prompt"]},
                                                 [0] * 8, i)) for i in range(8)]
            await asyncio.sleep(1.5)
            router.proc.send_signal(signal.SIGKILL)
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert any(isinstance(r, BaseException) for r in results)

    asyncio.run(crash())
    for worker in (prefill, decode):  # leases expire (6 s), aborted requests free their blocks
        wait_until(lambda: metric(worker.url, "quadrant_kv_cache_usage_ratio") == 0.0
                   and metric(worker.url, "quadrant_num_requests_running") == 0.0, timeout=30)
    assert metric(prefill.url, "quadrant_kv_transfer", what="active_leases") == 0.0
    again = start_router(tmp_path, [prefill], [decode])
    try:
        got = completion(again.url, {**body, "stream": False, "max_tokens": 16})
        want = completion(colocated.url, {**body, "stream": False, "max_tokens": 16})
        assert got["choices"][0]["text"] == want["choices"][0]["text"]
    finally:
        stop_router(again)
