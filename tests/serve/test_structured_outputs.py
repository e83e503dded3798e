"""Structured outputs and field refusals through a real server, with the official openai client.

Every constrained answer must parse and validate (jsonschema); every bad schema, regex or
grammar must be a 400 naming its field, with the server still answering afterwards.
"""

from __future__ import annotations

import json
import random
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

MODEL = "smollm2:135m"
ASK = [{"role": "user", "content": "Describe a person called Ann, aged 31, who lives in Paris."}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


# Bounded fields: a 135M model told "any integer" may write digits until max_tokens.
class Person(BaseModel):
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=150)
    city: str = Field(max_length=24)


def test_parse_with_a_pydantic_model(client):
    r = client.chat.completions.parse(model=MODEL, response_format=Person, max_tokens=80, temperature=0, messages=ASK)
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Person)  # the client parsed and validated it
    assert Person.model_validate_json(choice.message.content) == choice.message.parsed


def test_json_mode_and_its_stream(client):
    kw = dict(model=MODEL, messages=ASK, max_tokens=120, temperature=0, response_format={"type": "json_object"})
    whole = client.chat.completions.create(**kw)
    assert whole.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(whole.choices[0].message.content), dict)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content


def test_sampled_outputs_follow_the_schema(client):
    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
    }, "required": ["name", "age", "hobbies"], "additionalProperties": False}
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=150, temperature=1.0, seed=7, n=4,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}})
    assert len(r.choices) == 4
    for choice in r.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_regex_choice_and_grammar_extensions(client):
    ask = dict(model=MODEL, max_tokens=20, temperature=0)
    r = client.completions.create(prompt="Today's date in ISO form:", **ask,
                                  extra_body={"structured_outputs": {"regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"}})
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", r.choices[0].text)
    r = client.chat.completions.create(messages=[{"role": "user", "content": "Which is a fruit?"}], **ask,
                                       extra_body={"guided_choice": ["carrot", "apple", "potato"]})
    assert r.choices[0].message.content in ("carrot", "apple", "potato")
    gbnf = 'root ::= answer "." \nanswer ::= "yes" | "no"'  # llama.cpp's GBNF
    r = client.completions.create(prompt="Is the sky blue? Answer:", extra_body={"grammar": gbnf}, **ask)
    assert r.choices[0].text in ("yes.", "no.")
    r = client.completions.create(prompt="A JSON list of two numbers:", **ask,
                                  extra_body={"json_schema": {"type": "array", "items": {"type": "number"},
                                                              "minItems": 2, "maxItems": 2}})
    assert len(json.loads(r.choices[0].text)) == 2


def _random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A small random JSON schema whose every instance is short (bounded strings and arrays)."""
    kinds = ["string", "integer", "number", "boolean", "enum", "null"] + (["object", "array"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 12)}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 100)}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", 1, 2.5, True, None], rng.randint(1, 4))}
    if kind == "array":
        return {"type": "array", "items": _random_schema(rng, depth + 1), "maxItems": rng.randint(1, 3)}
    if kind == "object":
        names = rng.sample(["a", "b", "city", "score", "tags", "ok"], rng.randint(1, 3))
        props = {n: _random_schema(rng, depth + 1) for n in names}
        return {"type": "object", "properties": props, "required": rng.sample(names, rng.randint(0, len(names))),
                "additionalProperties": False}
    return {"type": kind}


def test_schema_fuzz_every_output_validates(client):
    rng = random.Random(20261205)
    schemas = [{"type": "object", "properties": {"x": _random_schema(rng), "y": _random_schema(rng)},
                "required": ["x", "y"], "additionalProperties": False} for _ in range(10)]

    def ask(i_schema):
        i, schema = i_schema
        r = client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=160, temperature=0.0 if i % 2 else 1.0, seed=i,
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}})
        return schema, r.choices[0]

    with ThreadPoolExecutor(5) as pool:  # batched together, greedy and sampled rows side by side
        for schema, choice in pool.map(ask, enumerate(schemas)):
            assert choice.finish_reason == "stop", (schema, choice.message.content)
            jsonschema.validate(json.loads(choice.message.content), schema)


@pytest.mark.parametrize("extra,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectz"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"guided_json": '{"type": "object", "properties": '}, "guided_json"),
    ({"guided_json": {"type": "string", "pattern": "(("}}, "guided_json"),
    ({"guided_regex": "("}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"grammar": "root ::= ("}, "grammar"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"guided_choice": ["a"], "regex": "a"}, "regex"),
    ({"store": True}, "store"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"no_such_field": 1}, "no_such_field"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
])
def test_bad_constraints_and_unsupported_fields_are_400s(server, extra, param):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"].startswith(param.split(".")[0])
    ok = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                    json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert ok.status_code == 200  # the server is still up


@pytest.mark.parametrize("extra,param", [
    ({"suffix": "end"}, "suffix"),
    ({"best_of": 3}, "best_of"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"messages": []}, "messages"),
])
def test_completion_fields_refused_by_name(server, extra, param):
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", **extra}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_fields_without_effect_are_accepted(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=3, temperature=0, user="u1",
                                       metadata={"k": "v"}, store=False, service_tier="auto",
                                       extra_body={"safety_identifier": "s", "prompt_cache_key": "p"})
    assert r.choices[0].finish_reason == "length"


def test_echo_scores_the_prompt(client, server):
    prompt = "The capital of France is"
    scored = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    choice = scored.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length" and scored.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens) == prompt and all(x < 0 for x in lp.token_logprobs[1:])
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    # Echo plus generation, whole and streamed: the prompt's records, then the new tokens'.
    kw = dict(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=1)
    whole = client.completions.create(**kw).choices[0]
    assert whole.text.startswith(prompt) and whole.logprobs.token_logprobs[: len(lp.tokens)] == lp.token_logprobs
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    streamed = [x for c in chunks if c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
    assert streamed == whole.logprobs.token_logprobs
    offsets = [x for c in chunks if c.choices[0].logprobs for x in c.choices[0].logprobs.text_offset]
    assert offsets == whole.logprobs.text_offset
    # vLLM's prompt_logprobs field alone, without echo.
    r = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": prompt, "max_tokens": 0, "prompt_logprobs": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == ""
    records = r.json()["choices"][0]["prompt_logprobs"]
    assert records[0] is None and len(records) == len(lp.tokens)
    ids = httpx.post(server.url + "/tokenize", json={"prompt": prompt}).json()["tokens"]
    assert [records[i][str(t)]["logprob"] for i, t in enumerate(ids) if i] == \
        pytest.approx(lp.token_logprobs[1:], abs=1e-6)  # each record holds its own token's logprob


def test_tokenizer_endpoints(server):
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "hello world", "add_special_tokens": False}).json()
    assert ids["count"] == len(ids["tokens"]) == 2
    back = httpx.post(server.url + "/detokenize", json={"tokens": ids["tokens"]}).json()
    assert back["prompt"] == "hello world"
    chat = httpx.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 2
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["eos_token"] == "<|im_end|>" and "<|im_start|>" in info["chat_template"]
    bad = httpx.post(server.url + "/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
