"""The server through the official `openai` client, and every error case through httpx."""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from quadrant.loader.source import open_model

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(default_gguf_path):
    return open_model(default_gguf_path).tokenizer()


def test_models(client):
    from quadrant.loader import store

    # The served model first, then every other pulled model (servable on demand).
    ids = [m.id for m in client.models.list().data]
    assert ids == ["smollm2:135m", *sorted(m.name for m in store.list_models() if m.name != "smollm2:135m")]


def test_completion_usage_and_finish(client, tokenizer):
    r = client.completions.create(model="smollm2:135m", prompt=PROMPT, max_tokens=6, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "length" and r.object == "text_completion"
    assert r.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert r.usage.completion_tokens == 6 and r.usage.total_tokens == r.usage.prompt_tokens + 6
    assert "Paris" in c.text


def test_chat_and_stream_agree(client):
    r = client.chat.completions.create(model="smollm2:135m", messages=CHAT, max_tokens=30, temperature=0)
    assert r.choices[0].finish_reason == "stop" and "Paris" in r.choices[0].message.content
    chunks = list(client.chat.completions.create(model="smollm2:135m", messages=CHAT, max_tokens=30, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens


def test_n_seed_and_stop(client):
    kw = dict(model="smollm2:135m", prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=42)
    a = client.completions.create(n=3, **kw)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    b = client.completions.create(n=3, **kw)
    assert [c.text for c in sorted(a.choices, key=lambda c: c.index)] == \
        [c.text for c in sorted(b.choices, key=lambda c: c.index)]  # same seed, same samples
    greedy = client.completions.create(model="smollm2:135m", prompt=PROMPT, max_tokens=8, temperature=0)
    text = greedy.choices[0].text
    stop = text[3:6]
    s = client.completions.create(model="smollm2:135m", prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop])
    assert s.choices[0].text == text[: text.index(stop)] and s.choices[0].finish_reason == "stop"


def test_logprobs_formats(client):
    r = client.completions.create(model="smollm2:135m", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert all(x <= 0 for x in lp.token_logprobs) and all(len(t) == 2 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text
    c = client.chat.completions.create(model="smollm2:135m", messages=CHAT, max_tokens=3, temperature=0,
                                       logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)
    assert content[0].top_logprobs[0].logprob == pytest.approx(content[0].logprob)  # greedy took the top token


def test_token_id_and_list_prompts(client, tokenizer):
    ids = tokenizer.encode(PROMPT)
    r = client.completions.create(model="smollm2:135m", prompt=[ids, ids], max_tokens=2, temperature=0)
    assert len(r.choices) == 2 and r.choices[0].text == r.choices[1].text
    assert r.usage.prompt_tokens == 2 * len(ids)


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    (b'{"model": "smollm2:135m", "prompt": "hi", "max_tokens": "many"}', 400, "max_tokens"),
    (b'{"model": "smollm2:135m", "prompt": "hi", "top_p": 2}', 400, "top_p"),
    (b'{"model": "smollm2:135m", "prompt": "hi", "n": 0}', 400, "n"),
    (b'{"model": "smollm2:135m", "prompt": ""}', 400, "prompt"),
    (b'{"model": "smollm2:135m", "prompt": "hi", "max_tokens": 9000}', 400, "max_tokens"),
    (b'{"model": "smollm2:135m", "prompt": "hi", "logit_bias": {"999999": 5}}', 400, "logit_bias"),
    (b'{"model": "gpt-9", "prompt": "hi"}', 404, "model"),
    (b'{"prompt": "hi"}', 400, "model"),
])
def test_completion_errors(server, body, status, param):
    r = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


@pytest.mark.parametrize("body,param", [
    ({"model": "smollm2:135m", "messages": []}, "messages"),
    ({"model": "smollm2:135m", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"model": "smollm2:135m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages.0.content"),
    ({"model": "smollm2:135m", "messages": CHAT, "max_completion_tokens": 100_000}, "max_tokens"),
    ({"model": "smollm2:135m", "messages": [{"role": "user", "content": "hello " * 9000}]}, "messages"),
])
def test_chat_errors(server, body, param):
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    # ... and the server keeps serving everyone else.
    assert httpx.get(server.url + "/health").status_code == 200


def test_version_and_metrics(server):
    assert httpx.get(server.url + "/version").json()["version"]
    text = httpx.get(server.url + "/metrics").text
    for name in ("quadrant_requests_total", "quadrant_prompt_tokens_total", "quadrant_generation_tokens_total",
                 "quadrant_num_requests_running", "quadrant_num_requests_waiting", "quadrant_kv_cache_usage_ratio",
                 "quadrant_prefix_cache_hit_rate", "quadrant_time_to_first_token_seconds_bucket",
                 "quadrant_time_per_output_token_seconds_bucket", "quadrant_e2e_request_latency_seconds_bucket"):
        assert name in text


def test_metrics_count_engine_steps(server):
    """quadrant_engine_steps: every step counts; none overlapped on a server without --async-scheduling."""
    def steps(what: str) -> float:
        text = httpx.get(server.url + "/metrics").text
        return float(re.search(rf'^quadrant_engine_steps{{what="{what}"}} (\S+)$', text, re.M).group(1))

    before = steps("total")
    body = {"model": "smollm2:135m", "prompt": "Once upon a time", "max_tokens": 3, "temperature": 0.0}
    assert httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code == 200
    assert steps("total") >= before + 3  # the prompt's step and two decode steps at least
    assert steps("overlapped") == 0


def test_stream_n_finishes_each_choice_once(server):
    body = {"model": "smollm2:135m", "prompt": "Once upon a time", "max_tokens": 12, "n": 3, "temperature": 1.0,
            "seed": 3, "stream": True}
    finishes: dict[int, int] = {}
    texts: dict[int, str] = {}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                import json

                choice = json.loads(line[6:])["choices"][0]
                texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
                if choice["finish_reason"]:
                    finishes[choice["index"]] = finishes.get(choice["index"], 0) + 1
    assert finishes == {0: 1, 1: 1, 2: 1}
    plain = httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=60).json()
    assert {c["index"]: c["text"] for c in plain["choices"]} == texts  # same seed: same samples, streamed or not


def test_stop_list_limit(server):
    body = {"model": "smollm2:135m", "prompt": "hi", "stop": [f"s{i}" for i in range(17)]}
    r = httpx.post(server.url + "/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    long_stop = {"model": "smollm2:135m", "prompt": "hi", "max_tokens": 2, "stop": "a stop string longer than 16"}
    assert httpx.post(server.url + "/v1/completions", json=long_stop, timeout=60).status_code == 200


def test_loopback_server_refuses_foreign_host_header(server):
    # DNS rebinding: a page on evil.example resolves its name to 127.0.0.1 and calls us.
    r = httpx.get(server.url + "/v1/models", headers={"Host": "evil.example"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
    assert httpx.get(server.url + "/v1/models", headers={"Host": "localhost:8000"}).status_code == 200
