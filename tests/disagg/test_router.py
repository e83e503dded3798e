"""The router in front of real `quadrant serve` workers on loopback (three plain workers, no --role:
each answers both steps), started as `python -m quadrant.disagg.router`; the stream bookkeeping of
a resume on its own; the launcher's argument and early-exit checks.

Tests that stop or kill a worker come last, in file order.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from quadrant.disagg.launch import launch_disagg, parse_disagg
from quadrant.disagg.resume import StreamTracker, decode_body, prefill_body
from quadrant.errors import QuadrantError
from tests.serve.conftest import Server, free_port, start_server, wait_healthy

MODEL = "smollm2:135m"
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
COUNT = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"  # a continuation greedy decoding cannot get wrong


def start_router(tmp_path, prefill: list[Server], decode: list[Server], *args: str) -> Server:
    """`python -m quadrant.disagg.router` in front of the given workers, once its /health is 200."""
    port = free_port()
    log_path = str(tmp_path / f"router-{port}.log")
    urls = [w for s in prefill for w in ("--prefill", s.url)] + [w for s in decode for w in ("--decode", s.url)]
    proc = subprocess.Popen([sys.executable, "-m", "quadrant.disagg.router", *urls, "--port", str(port), *args],
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    return wait_healthy(Server(proc, f"http://127.0.0.1:{port}", log_path), 60)


def stop_router(router: Server) -> None:
    assert router.stop() == 0, router.log()


@pytest.fixture(scope="module")
def workers(default_gguf_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("workers")
    # They load in parallel, one thread each: three workers on two cores must not thrash.
    with ThreadPoolExecutor(3) as pool:
        servers = list(pool.map(lambda _: start_server(tmp, env={"OMP_NUM_THREADS": "1"}), range(3)))
    yield servers
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def router(workers, tmp_path_factory):
    a, b, c = workers
    # Health checks only at startup (the interval outlasts the module): the kill test below then
    # finds the router still believing in the killed worker, and must retry.
    r = start_router(tmp_path_factory.mktemp("router"), [a, b], [c], "--health-interval", "600")
    yield r
    stop_router(r)


def post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=120)


def stream(url: str, path: str, body: dict[str, Any]) -> tuple[list[dict], list[str]]:
    """The chunks of a streamed answer, and every `data:` payload as sent ([DONE] included)."""
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        payloads = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    return [json.loads(p) for p in payloads if p != "[DONE]"], payloads


def text_of(chunks: list[dict], chat: bool) -> str:
    return "".join((c["delta"].get("content") or "") if chat else c["text"] for ch in chunks for c in ch["choices"])


def metric(url: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def workers_of(router: Server) -> dict[tuple[str, str], dict]:
    return {(w["role"], w["url"]): w for w in httpx.get(router.url + "/workers", timeout=10).json()["data"]}


# -- the two steps, relayed ------------------------------------------------------------------------

def test_completion_and_chat_equal_a_worker(workers, router):
    decode = workers[2]
    for path, body in (("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}),
                       ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 12,
                                                 "temperature": 0})):
        want = post(decode.url, path, body).json()
        r = post(router.url, path, body)
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["object"] == want["object"] and "kv_transfer_params" not in got
        assert got["choices"] == want["choices"] and got["usage"] == want["usage"]
    assert "Paris" in got["choices"][0]["message"]["content"]
    ws = workers_of(router)  # one prefill and one decode step per request, none left in flight
    assert sum(w["num_requests"] for (role, _), w in ws.items() if role == "prefill") == 2
    assert ws[("decode", decode.url)]["num_requests"] == 2
    assert all(w["in_flight"] == 0 for w in ws.values())
    # A batch of prompts goes straight to a decode worker (a prefill step takes one prompt).
    body = {"model": MODEL, "prompt": [PROMPT, "Once upon a time"], "max_tokens": 4, "temperature": 0}
    want, got = post(decode.url, "/v1/completions", body).json(), post(router.url, "/v1/completions", body).json()
    assert len(got["choices"]) == 2 and got["choices"] == want["choices"] and got["usage"] == want["usage"]


def test_streams_equal_a_worker(workers, router):
    decode = workers[2]
    for path, body, chat in (
            ("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}, False),
            ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 12, "temperature": 0}, True)):
        want = post(decode.url, path, body).json()
        chunks, payloads = stream(router.url, path, {**body, "stream_options": {"include_usage": True}})
        assert payloads.count("[DONE]") == 1 and payloads[-1] == "[DONE]"
        choices = [c for ch in chunks for c in ch["choices"]]
        want_text = want["choices"][0]["message"]["content"] if chat else want["choices"][0]["text"]
        assert text_of(chunks, chat) == want_text
        assert choices[-1]["finish_reason"] == want["choices"][0]["finish_reason"]
        assert chunks[-1]["usage"] == want["usage"]
        assert len({ch["id"] for ch in chunks}) == 1
        # The router asked the worker for token ids (to resume from); the client did not.
        assert all("token_ids" not in c for c in choices) and all("prompt_token_ids" not in ch for ch in chunks)
    # A client that asks for token ids gets them.
    chunks, _ = stream(router.url, "/v1/chat/completions",
                       {"model": MODEL, "messages": CHAT, "max_tokens": 4, "temperature": 0, "return_token_ids": True})
    assert chunks[0]["prompt_token_ids"] and sum(len(c["choices"][0]["token_ids"]) for c in chunks) == 4
    assert metric(router.url, "quadrant_router_time_to_first_token_seconds_count") == 3
    assert metric(router.url, "quadrant_router_time_per_output_token_seconds_count") == 3
    # Goodput: every finished stream counted; those within the (default 2 s / 0.1 s) SLOs among them.
    assert metric(router.url, "quadrant_router_streams_finished_total") == 3
    assert 0 <= metric(router.url, "quadrant_router_slo_attained_total") <= 3


def test_worker_4xx_is_relayed(router):
    r = post(router.url, "/v1/completions", {"model": "no-such-model", "prompt": PROMPT})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    with httpx.stream("POST", router.url + "/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": CHAT, "stream": True, "temperature": 5}) as s:
        assert s.status_code == 400 and json.loads(s.read())["error"]["param"] == "temperature"
    r = post(router.url, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = httpx.get(router.url + "/v1/models", timeout=10)
    assert [m["id"] for m in r.json()["data"]][0] == MODEL  # a worker's list, relayed (then its other pulled models)


def test_bad_input_is_an_openai_400(router):
    for content in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        r = httpx.post(router.url + "/v1/chat/completions", content=content, timeout=10,
                       headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = post(router.url, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "stream": "yes"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"
    r = post(router.url, "/workers", {"url": "http://127.0.0.1:1", "role": "both"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "role"
    r = post(router.url, "/workers", {"url": "127.0.0.1:1", "role": "decode"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "url"
    r = httpx.request("DELETE", router.url + "/workers", json={"url": "http://127.0.0.1:1"}, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "worker_not_found"


def test_register_and_deregister(workers, router):
    decode = workers[2]
    r = httpx.request("DELETE", router.url + "/workers", json={"url": decode.url}, timeout=10)
    assert r.status_code == 200 and [w["role"] for w in r.json()["data"]] == ["decode"]
    r = httpx.get(router.url + "/health", timeout=10)
    assert r.status_code == 503 and r.json()["missing"] == ["decode"]
    r = post(router.url, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_worker"
    r = post(router.url, "/workers", {"url": decode.url + "/", "role": "decode"})
    assert r.status_code == 200 and r.json()["healthy"] and r.json()["url"] == decode.url
    again = post(router.url, "/workers", {"url": decode.url, "role": "decode"})  # registering twice: a no-op
    assert again.status_code == 200 and sum(1 for _, url in workers_of(router) if url == decode.url) == 1
    assert httpx.get(router.url + "/health", timeout=10).status_code == 200
    assert post(router.url, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}).status_code == 200
    assert sorted(role for role, _ in workers_of(router)) == ["decode", "prefill", "prefill"]
    # A dead URL registers, unhealthy, and gets no requests.
    dead = f"http://127.0.0.1:{free_port()}"
    r = post(router.url, "/workers", {"url": dead, "role": "decode"})
    assert r.status_code == 200 and not r.json()["healthy"] and r.json()["last_error"]
    assert post(router.url, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}).status_code == 200
    assert workers_of(router)[("decode", dead)]["num_requests"] == 0
    assert httpx.request("DELETE", router.url + "/workers", json={"url": dead, "role": "decode"}).status_code == 200


def test_client_disconnect_frees_the_worker(workers, router):
    decode = workers[2]
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", router.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert metric(decode.url, "quadrant_num_requests_running") == 1
    # Gone long before 1500 tokens could be generated on this CPU.
    deadline = time.monotonic() + 10
    while metric(decode.url, "quadrant_num_requests_running") or metric(
            router.url, "quadrant_router_requests_in_flight"):
        assert time.monotonic() < deadline, "the worker still runs the abandoned request"
        time.sleep(0.2)
    assert workers_of(router)[("decode", decode.url)]["in_flight"] == 0


def test_router_metrics(router):
    assert post(router.url, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}).status_code == 200
    assert metric(router.url, "quadrant_router_healthy_workers", pool="prefill") == 2
    assert metric(router.url, "quadrant_router_healthy_workers", pool="decode") == 1
    text = httpx.get(router.url + "/metrics", timeout=10).text
    for name in ("quadrant_router_queue_depth", "quadrant_router_retries_total", "quadrant_router_resumed_streams",
                 "quadrant_router_worker_failures_total"):
        assert name in text
    assert metric(router.url, "quadrant_router_requests_total", endpoint="/v1/completions", status="200") >= 1
    assert metric(router.url, "quadrant_router_requests_in_flight") == 0


# -- failures (these stop or kill workers) --------------------------------------------------------

def test_decode_stream_resumes_on_another_worker(workers, tmp_path):
    """A decode worker that stops mid-stream (SIGSTOP: the router's read timeout) is replaced by the
    other one, which continues each choice from the token ids relayed: the client sees one stream."""
    a, b, c = workers
    by_url = {s.url: s for s in workers}
    r = start_router(tmp_path, [a], [b, c], "--health-interval", "0.3", "--request-timeout", "2")
    try:
        for path, chat, body in (
                ("/v1/completions", False, {"model": MODEL, "prompt": COUNT, "max_tokens": 24, "temperature": 0}),
                ("/v1/chat/completions", True, {"model": MODEL, "max_tokens": 24, "temperature": 0, "messages": [
                    {"role": "user", "content": "Count from 1 to 30, separated by commas."}]})):
            want = post(a.url, path, body).json()
            want_text = want["choices"][0]["message"]["content"] if chat else want["choices"][0]["text"]
            payloads, stopped = [], None
            with httpx.stream("POST", r.url + path, json={**body, "stream": True,
                                                          "stream_options": {"include_usage": True}}, timeout=60) as s:
                for line in s.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    payloads.append(line[6:])
                    if len(payloads) == 4:
                        busy = [url for (role, url), w in workers_of(r).items() if role == "decode" and w["in_flight"]]
                        assert len(busy) == 1
                        stopped = by_url[busy[0]]
                        stopped.proc.send_signal(signal.SIGSTOP)
            assert stopped is not None
            stopped.proc.send_signal(signal.SIGCONT)
            chunks = [json.loads(p) for p in payloads if p != "[DONE]"]
            assert payloads.count("[DONE]") == 1 and payloads[-1] == "[DONE]"
            assert text_of(chunks, chat) == want_text
            assert len({ch["id"] for ch in chunks}) == 1 and {c["index"] for ch in chunks for c in ch["choices"]} == {0}
            assert [c["finish_reason"] for ch in chunks for c in ch["choices"]][-1] == "length"
            assert chunks[-1]["usage"]["completion_tokens"] == 24
            assert chunks[-1]["usage"]["prompt_tokens"] == want["usage"]["prompt_tokens"]
            assert all("token_ids" not in c for ch in chunks for c in ch["choices"])
            # Marked failed, then healthy again once its health check passes.
            deadline = time.monotonic() + 15
            while not workers_of(r)[("decode", stopped.url)]["healthy"]:
                assert time.monotonic() < deadline, r.log()
                time.sleep(0.2)
        assert metric(r.url, "quadrant_router_resumed_streams_total") == 2
        assert metric(r.url, "quadrant_router_worker_failures_total", pool="decode") >= 2
    finally:
        for s in workers:
            s.proc.send_signal(signal.SIGCONT)
        stop_router(r)


def test_killed_prefill_worker_is_retried(workers, router):
    prompt = "Here is a long shared system prompt that the router remembers by its 64-character blocks. " * 3
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0}
    before = workers_of(router)
    first = post(router.url, "/v1/completions", body)
    assert first.status_code == 200
    after = workers_of(router)
    (owner,) = [url for (role, url), w in after.items()
                if role == "prefill" and w["num_requests"] > before[(role, url)]["num_requests"]]
    victim = next(s for s in workers if s.url == owner)
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(timeout=10)
    # The prefix cache sends the same prompt to the dead worker (the router has not noticed yet):
    # the connection fails and the other prefill worker does the step.
    again = post(router.url, "/v1/completions", body)
    assert again.status_code == 200, again.text
    assert metric(router.url, "quadrant_router_retries_total", pool="prefill") == 1
    assert metric(router.url, "quadrant_router_worker_failures_total", pool="prefill") == 1
    dead = workers_of(router)[("prefill", owner)]
    assert not dead["healthy"] and dead["last_error"]
    assert post(router.url, "/v1/completions", body).status_code == 200  # no retry needed any more
    assert metric(router.url, "quadrant_router_retries_total", pool="prefill") == 1


# -- pure parts ------------------------------------------------------------------------------------

def test_step_bodies():
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 50, "max_completion_tokens": 50, "n": 3, "stream": True,
            "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 2, "temperature": 0.5}
    p = prefill_body(body, chat=True)
    assert p == {"model": MODEL, "messages": CHAT, "max_tokens": 1, "max_completion_tokens": 1, "n": 1,
                 "stream": False, "temperature": 0.5, "logprobs": True, "top_logprobs": 2,
                 "kv_transfer_params": {"do_remote_decode": True}}
    d = decode_body(body, {"transfer_id": "t"}, stream=True)
    assert d == {**body, "kv_transfer_params": {"transfer_id": "t"}, "return_token_ids": True}
    assert decode_body({"prompt": "x"}, None, stream=False) == {"prompt": "x"}


def test_tracker_resumes_from_relayed_token_ids():
    """The bookkeeping of a chat stream with n=2 that breaks after choice 1 finished and choice 0
    relayed two tokens: a /v1/completions request per unfinished choice, translated back."""
    body = {"model": MODEL, "messages": CHAT, "n": 2, "max_tokens": 5, "temperature": 0.7, "top_p": 0.9,
            "stream": True, "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 1}
    t = StreamTracker(body, chat=True)

    def chunk(index: int, content: str, ids: list[int], reason: str | None = None, **top: Any) -> str:
        return json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": MODEL,
                           "choices": [{"index": index, "delta": {"content": content}, "finish_reason": reason,
                                        "logprobs": None, "token_ids": ids}], **top})

    out = t.accept(chunk(0, "", [], prompt_token_ids=[1, 2, 3]))
    assert out is not None and "token_ids" not in out and "prompt_token_ids" not in out
    assert json.loads(out)["choices"][0]["delta"] == {"content": ""}
    t.accept(chunk(0, "Hel", [10]))
    t.accept(chunk(1, "Yo", [20]))
    t.accept(chunk(0, "lo", [11]))
    t.accept(chunk(1, "!", [21], "stop"))
    assert t.new_tokens == 1 and t.resumable() and t.unfinished() == [0] and not t.done
    resume = t.resume_body(0)
    assert resume == {"model": MODEL, "temperature": 0.7, "top_p": 0.9, "max_tokens": 3, "logprobs": 1,
                      "prompt": [1, 2, 3, 10, 11], "stream": True, "n": 1, "return_token_ids": True}
    resumed = json.dumps({"id": "cmpl-9", "object": "text_completion", "created": 8, "model": MODEL,
                          "choices": [{"index": 0, "text": " there", "finish_reason": None, "token_ids": [12],
                                       "logprobs": {"tokens": [" there"], "token_logprobs": [-0.5],
                                                    "top_logprobs": [{" there": -0.5}], "text_offset": [0]}}]})
    got = json.loads(t.translate(0, resumed) or "")
    assert got["id"] == "chatcmpl-1" and got["object"] == "chat.completion.chunk" and got["created"] == 7
    assert got["choices"] == [{"index": 0, "finish_reason": None, "delta": {"content": " there"}, "logprobs": {
        "content": [{"token": " there", "logprob": -0.5, "bytes": list(b" there"),
                     "top_logprobs": [{"token": " there", "logprob": -0.5, "bytes": list(b" there")}]}]}}]
    usage_only = json.dumps({"id": "cmpl-9", "choices": [], "usage": {"prompt_tokens": 6}})
    assert t.translate(0, usage_only) is None  # the client gets one usage chunk, for the whole stream
    assert t.resume_body(0)["max_tokens"] == 2 and t.resume_body(0)["prompt"] == [1, 2, 3, 10, 11, 12]
    t.translate(0, json.dumps({"choices": [{"index": 0, "text": "", "finish_reason": "stop", "token_ids": [2]}]}))
    assert t.unfinished() == []
    assert t.usage_chunk()["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
    assert t.usage_chunk()["id"] == "chatcmpl-1" and t.usage_chunk()["choices"] == []


def test_tracker_edge_cases():
    # Completions: max_tokens all relayed before the break -> no request, a finish chunk instead.
    t = StreamTracker({"model": MODEL, "prompt": "x", "max_tokens": 2, "logprobs": 0}, chat=False)
    t.accept(json.dumps({"id": "c", "prompt_token_ids": [5], "choices": [{"index": 0, "text": "ab", "token_ids": [1, 2],
                                                                          "finish_reason": None}]}))
    assert t.resume_body(0) is None
    assert t.finish_chunk(0, "length")["choices"] == [{"index": 0, "finish_reason": "length", "logprobs": None,
                                                       "text": ""}]
    # Text offsets of a resumed choice go on from the text already relayed.
    t = StreamTracker({"model": MODEL, "prompt": "x", "max_tokens": 4, "logprobs": 0, "return_token_ids": True},
                      chat=False)
    assert t.accept(json.dumps({"id": "c", "prompt_token_ids": [5],
                                "choices": [{"index": 0, "text": "ab", "token_ids": [1]}]})) is None  # kept as is
    assert t.resume_body(0)["logprobs"] == 0 and t.resume_body(0)["max_tokens"] == 3
    got = json.loads(t.translate(0, json.dumps({"choices": [{"index": 0, "text": "c", "token_ids": [3], "logprobs": {
        "tokens": ["c"], "token_logprobs": [0.0], "top_logprobs": None, "text_offset": [0]}}]})) or "")
    assert got["choices"][0]["logprobs"]["text_offset"] == [2] and got["choices"][0]["token_ids"] == [3]
    # A batch of prompts: each choice's first chunk names its prompt; one not seen yet cannot resume.
    t = StreamTracker({"model": MODEL, "prompt": ["a", "b"], "max_tokens": 4}, chat=False)
    t.accept(json.dumps({"id": "c", "prompt_token_ids": [7], "choices": [{"index": 1, "text": "x", "token_ids": [1]}]}))
    assert t.unfinished() == [0, 1] and not t.resumable()
    t.accept(json.dumps({"id": "c", "prompt_token_ids": [6], "choices": [{"index": 0, "text": "", "token_ids": []}]}))
    assert t.resumable() and t.resume_body(1)["prompt"] == [7, 1] and t.resume_body(0)["prompt"] == [6]
    # A worker without token ids: nothing to resume from.
    t = StreamTracker({"model": MODEL, "prompt": ["a", "b"], "n": 2}, chat=False)
    assert sorted(t.choices) == [0, 1, 2, 3]
    t.accept(json.dumps({"id": "c", "choices": [{"index": 0, "text": "hi", "finish_reason": None}]}))
    assert not t.resumable()
    assert t.accept("[DONE]") is None and t.done


# -- the launcher ----------------------------------------------------------------------------------

def test_parse_disagg():
    assert parse_disagg("1P1D") == (1, 1) and parse_disagg("2p1d") == (2, 1) and parse_disagg("12P3D") == (12, 3)
    for bad in ("", "1P", "P1D", "0P1D", "1P0D", "1D1P", "1P1D2", "xPyD"):
        with pytest.raises(ValueError, match="xPyD"):
            parse_disagg(bad)


def test_launch_names_a_worker_that_exits_early():
    expected = r"(?s)the (prefill|decode)-0 worker exited with code 2 before it was ready.*invalid int value: 'many'"
    with pytest.raises(QuadrantError, match=expected):
        launch_disagg(MODEL, "1P1D", "127.0.0.1", free_port(), ["--max-num-seqs", "many"])
