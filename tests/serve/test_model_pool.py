"""Several models on one server: loaded on first request, unloaded after keep_alive idle (or at once
with Ollama's keep_alive 0), at most --max-loaded-models together (the least recently used idle one
goes), listed by /v1/models, /api/ps and `quadrant ps`. The extra models are the default GGUF under
other names: real engines, quick to load."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import openai
import pytest

from quadrant.serve.model_pool import parse_keep_alive
from tests.serve.conftest import start_server

ollama = pytest.importorskip("ollama")
MODEL = "smollm2:135m"
ASK = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(default_gguf_path, tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("pool"), "--models", f"second={MODEL}", f"third={MODEL}",
                     "--max-loaded-models", "2", "--no-serve-pulled", "--keep-alive", "10m")
    yield s
    assert s.stop() == 0, s.log()


def loaded(server) -> list[str]:
    return [m["name"] for m in httpx.get(server.url + "/api/ps").json()["models"]]


def test_keep_alive_parses_like_ollama():
    assert [parse_keep_alive(v, 300) for v in (None, 30, "45s", "5m", "1h", "-1", "250ms")] == \
        [300, 30, 45, 300, 3600, -1, 0.25]
    with pytest.raises(ValueError):
        parse_keep_alive("soon", 300)


def test_models_load_on_demand_and_answer_alike(server):
    assert loaded(server) == [MODEL]
    listed = [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]
    assert listed == [MODEL, "second", "third"]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    first = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=12, temperature=0)
    other = client.chat.completions.create(model="second", messages=ASK, max_tokens=12, temperature=0)
    assert other.model == "second" and other.choices[0].message.content == first.choices[0].message.content
    assert loaded(server) == [MODEL, "second"]
    ps = {m["name"]: m for m in httpx.get(server.url + "/api/ps").json()["models"]}
    assert ps[MODEL]["expires_at"].startswith("9999")  # the primary stays
    assert not ps["second"]["expires_at"].startswith("9999") and ps["second"]["memory_bytes"] > 50e6
    missing = httpx.post(server.url + "/v1/chat/completions", json={"model": "gpt-9", "messages": ASK})
    assert missing.status_code == 404 and "second" in missing.json()["error"]["message"]


def test_the_budget_unloads_the_least_recently_used(server):
    client = ollama.Client(host=server.url)
    client.generate(model="second", prompt="hi", options={"num_predict": 2})
    client.generate(model="third", prompt="hi", options={"num_predict": 2})  # budget 2: second goes
    assert loaded(server) == [MODEL, "third"]
    out = subprocess.run([sys.executable, "-m", "quadrant", "ps", "--port", server.url.rsplit(":", 1)[1]],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "third" in out.stdout and "forever" in out.stdout and MODEL in out.stdout


def test_keep_alive_unloads_idle_models(server):
    client = ollama.Client(host=server.url)
    assert client.generate(model="second", keep_alive="1s").done_reason == "load"  # Ollama's preload
    assert "second" in loaded(server)
    deadline = time.monotonic() + 30
    while "second" in loaded(server) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "second" not in loaded(server)
    client.generate(model="third", prompt="hi", options={"num_predict": 2})
    assert client.generate(model="third", keep_alive=0).done_reason == "unload"  # Ollama's unload
    assert loaded(server) == [MODEL]
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model=MODEL, keep_alive=0)  # the primary is pinned
    assert e.value.status_code == 400
    bad = httpx.post(server.url + "/api/generate", json={"model": "second", "prompt": "x", "keep_alive": "soon"})
    assert bad.status_code == 400 and "keep_alive" in bad.json()["error"]


def test_a_pulled_model_is_served_on_demand(default_gguf_path, gemma_gguf_path, tmp_path):
    """As in Ollama, every pulled model is servable: gemma3:270m loads on its first request."""
    s = start_server(tmp_path, "--keep-alive", "-1")
    try:
        listed = [m["id"] for m in httpx.get(s.url + "/v1/models").json()["data"]]
        assert listed[0] == MODEL and "gemma3:270m" in listed
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        r = client.completions.create(model="gemma3:270m", prompt="The capital of France is", max_tokens=8,
                                      temperature=0)
        assert r.model == "gemma3:270m" and "capital" in r.choices[0].text  # " the capital of the country of France"
        assert loaded(s) == [MODEL, "gemma3:270m"]
        ps = {m["name"]: m for m in httpx.get(s.url + "/api/ps").json()["models"]}
        assert ps["gemma3:270m"]["expires_at"].startswith("9999")  # --keep-alive -1: for good
        no_template = client.chat.completions.with_raw_response.create  # a base model: no chat template
        with pytest.raises(openai.BadRequestError, match="chat template"):
            no_template(model="gemma3:270m", messages=ASK, max_tokens=4)
    finally:
        assert s.stop() == 0, s.log()
