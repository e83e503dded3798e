"""The server under attack, load and faults: API key, body limit, backpressure (429), client
disconnects (KV freed at once), SIGTERM drain, a bounded load test, and schemathesis fuzzing."""

from __future__ import annotations

import asyncio
import json

import threading
import time

import httpx
import pytest

from tests.serve.conftest import start_server

BODY = {"model": "smollm2:135m", "prompt": "Tell me a story.", "max_tokens": 8, "temperature": 0}


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", headers={"Authorization": "Bearer k3y"}).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith(name + "_"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_api_key_and_body_limit(default_gguf_path, tmp_path):
    server = start_server(tmp_path, "--api-key", "k3y", "--max-body-bytes", "64KiB")
    try:
        assert httpx.get(server.url + "/health").status_code == 200  # open
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k3y"}, {"Authorization": "Bearer K3Y"}):
            r = httpx.get(server.url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            assert httpx.post(server.url + "/v1/completions", json=BODY, headers=headers).status_code == 401
        ok = {"Authorization": "Bearer k3y"}
        assert httpx.get(server.url + "/v1/models", headers=ok).status_code == 200
        big = {**BODY, "prompt": "x" * 100_000}
        r = httpx.post(server.url + "/v1/completions", json=big, headers=ok)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunks():  # no Content-Length: the guard must count the streamed body
            yield json.dumps(big).encode()

        assert httpx.post(server.url + "/v1/completions", content=chunks(), headers=ok).status_code == 413
        assert httpx.post(server.url + "/v1/completions", json=BODY, headers=ok).status_code == 200
    finally:
        assert server.stop() == 0


def test_backpressure_429_never_hangs(default_gguf_path, tmp_path):
    server = start_server(tmp_path, "--max-num-seqs", "1", "--max-queued-requests", "1")
    try:
        async def one(client):
            body = {**BODY, "max_tokens": 40, "ignore_eos": True}
            return await client.post(server.url + "/v1/completions", json=body, timeout=120)

        async def burst():
            async with httpx.AsyncClient() as client:
                return await asyncio.gather(*(one(client) for _ in range(8)))

        results = asyncio.run(burst())
        codes = sorted(r.status_code for r in results)
        assert set(codes) == {200, 429} and codes.count(200) >= 2
        assert all(r.headers.get("retry-after") for r in results if r.status_code == 429)
        assert all(r.json()["error"]["type"] == "rate_limit_error" for r in results if r.status_code == 429)
        assert httpx.post(server.url + "/v1/completions", json=BODY, timeout=60).status_code == 200
    finally:
        assert server.stop() == 0


def test_disconnect_frees_kv_and_sigterm_drains(default_gguf_path, tmp_path):
    server = start_server(tmp_path)
    try:
        long = {**BODY, "max_tokens": 2000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=long, timeout=60) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 5:
                    break  # hang up mid-stream
        deadline = time.monotonic() + 10
        while metric(server, "quadrant_num_requests_running") or metric(server, "quadrant_kv_cache_usage_ratio"):
            assert time.monotonic() < deadline, "the aborted request kept its KV blocks"
            time.sleep(0.05)

        # SIGTERM while a request runs: it completes, then the server exits 0.
        result = {}

        def slow_request():
            body = {**BODY, "max_tokens": 60, "ignore_eos": True}
            result["r"] = httpx.post(server.url + "/v1/completions", json=body, timeout=120)

        t = threading.Thread(target=slow_request)
        t.start()
        while not metric(server, "quadrant_num_requests_running"):
            time.sleep(0.02)
        assert server.stop() == 0
        t.join()
        assert result["r"].status_code == 200 and result["r"].json()["usage"]["completion_tokens"] == 60
    finally:
        server.stop()


def test_load_64_clients_some_disconnect(server):
    total, concurrency = 256, 64
    sent_prompt_tokens_before = metric(server, "quadrant_prompt_tokens_total")
    ok_before = metric(server, 'quadrant_requests_total{endpoint="/v1/completions",status="200"}')

    async def client(i: int, sem: asyncio.Semaphore, http: httpx.AsyncClient) -> tuple[str, int]:
        async with sem:
            body = {**BODY, "prompt": f"Request {i}: tell me about the number {i}.", "max_tokens": 6, "stream": True,
                    "ignore_eos": True}
            async with http.stream("POST", server.url + "/v1/completions", json=body, timeout=300) as r:
                assert r.status_code == 200
                events = []
                async for line in r.aiter_lines():
                    if not line:
                        continue
                    assert line.startswith("data: ")
                    events.append(line[6:])
                    if i % 8 == 0 and len(events) == 2:
                        return "left", 0  # this client disconnects early
                assert events[-1] == "[DONE]"
                chunks = [json.loads(e) for e in events[:-1]]
                assert all("error" not in c for c in chunks)
                assert chunks[-1]["choices"][0]["finish_reason"] == "length"
                return "done", len(chunks)

    async def main():
        sem = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency)) as http:
            return await asyncio.gather(*(client(i, sem, http) for i in range(total)))

    results = asyncio.run(main())
    done = [n for kind, n in results if kind == "done"]
    assert len(done) == total - total // 8 and all(n == 6 for n in done)  # one chunk per token
    time.sleep(0.5)
    ok_after = metric(server, 'quadrant_requests_total{endpoint="/v1/completions",status="200"}')
    assert ok_after - ok_before >= len(done)
    assert metric(server, "quadrant_prompt_tokens_total") > sent_prompt_tokens_before
    assert metric(server, "quadrant_num_requests_running") == 0


def test_schemathesis_finds_no_5xx(default_gguf_path, tmp_path):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    # A small KV budget bounds any generation the fuzzer asks for.
    server = start_server(tmp_path, "--kv-cache-memory", "8MiB")
    failures: list = []

    def fuzz(operation) -> None:
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(case=operation.as_strategy())
        def check(case) -> None:
            response = case.call(base_url=server.url, timeout=60)
            if response.status_code >= 500:
                failures.append((operation.label, case.body, response.status_code, response.text[:200]))

        check()

    try:
        schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
        operations = [op.ok() for op in schema.get_all_operations()]
        assert {o.label for o in operations} >= {"POST /v1/completions", "POST /v1/chat/completions"}
        for operation in operations:
            fuzz(operation)
        assert not failures, failures[:3]
        assert httpx.get(server.url + "/health").status_code == 200
    finally:
        assert server.stop() == 0
