"""Ollama's API through the official `ollama` client, and embeddings through it and through openai,
on one real server: the same answers as the OpenAI routes, options mapped (and unknown ones
refused by name), NDJSON streams, structured `format`, tool history, and embeddings equal to
transformers' mean-pooled hidden states."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import openai
import pytest
import torch

ollama = pytest.importorskip("ollama")

from quadrant.serve.ollama_api import _whole_calls  # noqa: E402

MODEL = "smollm2:135m"
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url)


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_catalogue_routes(client, server):
    tags = client.list()
    assert tags.models[0].model == MODEL and tags.models[0].details.family == "llama"  # then other pulled ones
    info = client.show(MODEL)
    assert info.details.family == "llama" and info.details.quantization_level == "Q4_1"
    assert info.details.parameter_size == "135M" and "<|im_start|>" in info.template
    assert info.modelinfo["llama.context_length"] > 0 and "tools" in info.capabilities
    running = client.ps()
    assert [m.model for m in running.models] == [MODEL]
    assert httpx.get(server.url + "/api/version").json()["version"]
    steps = [p.status for p in client.pull(MODEL, stream=True)]
    assert steps[0] == "pulling manifest" and steps[-1] == "success"
    with pytest.raises(ollama.ResponseError) as e:
        client.pull("no-such-model:1b")
    assert e.value.status_code == 404


def test_generate_and_chat_match_the_openai_routes(client, oai, server):
    greedy = {"temperature": 0, "num_predict": 24, "repeat_penalty": 1.0, "top_k": 0, "top_p": 1.0}
    chat = client.chat(model=MODEL, messages=[{"role": "user", "content": QUESTION}], options=greedy)
    same = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                       max_tokens=24, temperature=0)
    assert chat.message.content == same.choices[0].message.content and chat.done
    assert chat.eval_count == same.usage.completion_tokens and chat.prompt_eval_count == same.usage.prompt_tokens
    assert chat.total_duration > 0 and chat.done_reason == same.choices[0].finish_reason
    streamed = list(client.chat(model=MODEL, messages=[{"role": "user", "content": QUESTION}], options=greedy,
                                stream=True))
    assert "".join(p.message.content for p in streamed) == chat.message.content
    assert streamed[-1].done and not any(p.done for p in streamed[:-1])
    gen = client.generate(model=MODEL, prompt=QUESTION, options=greedy)
    assert gen.response == chat.message.content  # generate applies the chat template, as Ollama does
    raw = client.generate(model=MODEL, prompt="The capital of France is", raw=True, options=greedy)
    plain = oai.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=24, temperature=0)
    assert raw.response == plain.choices[0].text
    prompt_ids = httpx.post(server.url + "/tokenize", json={"prompt": "The capital of France is"}).json()["tokens"]
    assert raw.context[: len(prompt_ids)] == prompt_ids  # the prompt's and the answer's ids come back as context
    assert len(raw.context) == len(prompt_ids) + raw.eval_count


def test_options_map_and_unknown_ones_are_refused(client):
    seeded = {"temperature": 1.0, "seed": 11, "num_predict": 12, "top_k": 20, "top_p": 0.9, "min_p": 0.05}
    a = client.generate(model=MODEL, prompt="Once upon a time", raw=True, options=seeded)
    b = client.generate(model=MODEL, prompt="Once upon a time", raw=True, options=seeded)
    assert a.response == b.response and a.eval_count == 12 and a.done_reason == "length"
    stop = client.generate(model=MODEL, prompt="1, 2, 3, 4,", raw=True, options={"temperature": 0, "stop": [" 7"],
                                                                                 "num_predict": 30})
    assert " 7" not in stop.response and stop.done_reason == "stop"
    for options, name in (({"num_thread": 2}, "num_thread"), ({"mirostat": 2}, "mirostat"),
                          ({"temperature": "hot"}, "temperature"), ({"num_ctx": 4}, None)):
        with pytest.raises(ollama.ResponseError) as e:
            client.generate(model=MODEL, prompt=QUESTION, options=options)
        assert e.value.status_code == 400 and (name is None or name in e.value.error)
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="llama3:8b", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model=MODEL, prompt="hi", keep_alive=0)
    assert e.value.status_code == 400 and "keep_alive" in e.value.error


def test_format_gives_valid_json(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    r = client.chat(model=MODEL, messages=[{"role": "user", "content": "Describe Ann, aged 31."}], format=schema,
                    options={"temperature": 0, "num_predict": 60})
    value = json.loads(r.message.content)
    assert set(value) == {"name", "age"} and 0 <= value["age"] <= 120
    r = client.generate(model=MODEL, prompt="Three colours as JSON:", format="json",
                        options={"temperature": 0, "num_predict": 60})
    assert isinstance(json.loads(r.response), dict)


def test_tool_history_and_call_assembly(client):
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    history = [{"role": "user", "content": "What is 2 + 3?"},
               {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "add",
                                                                                  "arguments": {"a": 2, "b": 3}}}]},
               {"role": "tool", "content": "5", "tool_name": "add"}]
    r = client.chat(model=MODEL, messages=history, tools=[add], options={"temperature": 0, "num_predict": 20})
    assert r.done and r.message.role == "assistant"
    deltas = [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "add", "arguments": ""}},
              {"index": 0, "function": {"arguments": '{"a": 2, '}}, {"index": 0, "function": {"arguments": '"b": 3}'}}]
    assert _whole_calls(deltas) == [{"function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]


def test_empty_requests_load_the_model(client):
    assert client.generate(model=MODEL).done_reason == "load"
    assert client.chat(model=MODEL, messages=[]).done_reason == "load"


@pytest.fixture(scope="module")
def hf_model(default_gguf_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        default_gguf_path.parent, gguf_file=default_gguf_path.name, dtype=torch.float32).eval()


def test_embeddings_through_both_apis_match_transformers(client, oai, server, hf_model):
    texts = ["Paris is the capital of France.", "hello"]
    r = oai.embeddings.create(model=MODEL, input=texts)
    assert [d.index for d in r.data] == [0, 1] and r.usage.prompt_tokens > 2
    ids = [httpx.post(server.url + "/tokenize", json={"prompt": t}).json()["tokens"] for t in texts]
    for d, prompt in zip(r.data, ids):
        with torch.no_grad():
            hidden = hf_model.model(torch.tensor([prompt])).last_hidden_state[0].mean(0)
        want = hidden / hidden.norm()
        # The server's default CPU plan rounds the embedding table to bf16: cosine, not digits.
        assert torch.nn.functional.cosine_similarity(torch.tensor(d.embedding), want, dim=0).item() > 0.995
    # Batched differently, the GEMMs round differently: equal to 1e-4.
    ours = client.embed(model=MODEL, input=texts)
    assert np.allclose(ours.embeddings, [d.embedding for d in r.data], atol=1e-4)
    assert client.embeddings(model=MODEL, prompt=texts[1]).embedding == pytest.approx(r.data[1].embedding, abs=1e-4)
    packed = oai.embeddings.create(model=MODEL, input=texts[1], encoding_format="base64")
    decoded = np.frombuffer(base64.b64decode(packed.data[0].embedding), dtype=np.float32)
    assert np.allclose(decoded, r.data[1].embedding, atol=1e-4)
    for body, param in (({"input": []}, "input"), ({"input": "x", "dimensions": 3}, "dimensions"),
                        ({"input": "x", "extra": 1}, "extra")):
        bad = httpx.post(server.url + "/v1/embeddings", json={"model": MODEL, **body})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param, bad.text
