"""Tool calling: the parsers of each family's format, the stream splitter, and a real server through
the openai and langchain-openai clients (required and named calls enforced, so the 135M default
model's calls are valid; streamed deltas as OpenAI sends them; tool results in the history)."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from quadrant.serve.tool_calls import ToolCalling, ToolError, format_for

MODEL = "smollm2:135m"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": -999, "maximum": 999},
                                                    "b": {"type": "integer", "minimum": -999, "maximum": 999}},
                   "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]

QWEN_LIKE = "{% if tools %}<tools>{{ tools | tojson }}</tools> answer in <tool_call></tool_call>{% endif %}"
MISTRAL_LIKE = "{% if tools %}[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]"
LLAMA_LIKE = "{% if tools %}Environment: ipython {{ tools }}{% endif %}<|python_tag|>"


def calling(template: str | None, choice="auto", parallel=True) -> ToolCalling:
    result = ToolCalling.parse(TOOLS, choice, parallel, template)
    assert result is not None
    return result


def test_formats_are_read_off_the_template():
    assert format_for(QWEN_LIKE) == ("hermes", True)
    assert format_for(MISTRAL_LIKE) == ("mistral", True)
    assert format_for(LLAMA_LIKE) == ("llama3", True)
    assert format_for("{{ messages }}") == ("hermes", False)  # no tools of its own: described in a system message


@pytest.mark.parametrize("template,text", [
    (QWEN_LIKE, 'Let me see.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'),
    (MISTRAL_LIKE, 'Let me see.[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}]'),
    (LLAMA_LIKE, '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}'),
])
def test_each_family_parses_and_streams_alike(template, text):
    tc = calling(template)
    content, calls = tc.extract(text)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("add", {"a": 1, "b": 2})]
    assert content == (None if tc.format == "llama3" else "Let me see.")
    stream, sent, deltas = tc.stream(), "", []
    for i, ch in enumerate(text):  # one character at a time: markers split across deltas
        c, d = stream.feed(ch, final=i == len(text) - 1)
        sent += c
        deltas += d
    assert sent.strip() == (content or "")
    assert deltas[0]["id"].startswith("call_") and deltas[0]["function"] == {"name": "add", "arguments": ""}
    assert json.loads("".join(d["function"]["arguments"] for d in deltas)) == {"a": 1, "b": 2}
    assert all(d["index"] == 0 for d in deltas) and all("name" not in d["function"] for d in deltas[1:])


def test_text_that_is_no_call_stays_content():
    tc = calling(QWEN_LIKE)
    for text in ("Plain answer.", '<tool_call>{"name": "nope", "arguments": {}}</tool_call>', "<tool_call>{broken"):
        assert tc.extract(text) == (text, [])
        stream = tc.stream()
        content, deltas = stream.feed(text, final=True)
        assert content == text and deltas == []


@pytest.mark.parametrize("tools,choice,param", [
    ([{"type": "function", "function": {"name": "bad name!"}}], "auto", "tools.0.function.name"),
    ([{"type": "retrieval"}], "auto", "tools.0"),
    ([WEATHER, WEATHER], "auto", "tools"),
    (TOOLS, {"type": "function", "function": {"name": "missing"}}, "tool_choice"),
    (TOOLS, "always", "tool_choice"),
    (None, "required", "tool_choice"),
])
def test_bad_tools_name_their_field(tools, choice, param):
    with pytest.raises(ToolError) as e:
        ToolCalling.parse(tools, choice, None, QWEN_LIKE)
    assert e.value.param == param


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def check_call(call, name: str | None = None) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    assert name is None or call.function.name == name
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMAS[call.function.name])
    return args


def test_required_and_named_calls_are_valid(client):
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=120, temperature=0)
    r = client.chat.completions.create(tool_choice="required", parallel_tool_calls=False, **kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    check_call(choice.message.tool_calls[0])
    r = client.chat.completions.create(tool_choice={"type": "function", "function": {"name": "add"}}, **kw)
    assert r.choices[0].finish_reason == "tool_calls"
    assert [check_call(c, "add") for c in r.choices[0].message.tool_calls]
    # Sampled, with parallel calls allowed: every call valid, however many it makes.
    r = client.chat.completions.create(tool_choice="required", n=3, seed=5, **{**kw, "temperature": 1.0,
                                                                                 "max_tokens": 250})
    for choice in r.choices:
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            check_call(call)


def test_streamed_tool_calls_arrive_as_openai_sends_them(client):
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=120, temperature=0, tool_choice="required",
              parallel_tool_calls=False)
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    chunks = [c for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    deltas = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices[0].delta.tool_calls]
    assert len({c.choices[0].delta.tool_calls is not None and len(c.choices[0].delta.tool_calls) for c in chunks
                if c.choices[0].delta.tool_calls}) == 1  # one tool-call delta per chunk
    first, rest = deltas[0], deltas[1:]
    assert first.id.startswith("call_") and first.type == "function" and first.function.name == whole.function.name
    assert first.function.arguments == "" and rest and all(d.id is None and d.function.name is None for d in rest)
    assert "".join(d.function.arguments for d in rest) == whole.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # The openai client's own stream helper puts them back together.
    with client.chat.completions.stream(**kw) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.tool_calls[0].function.arguments == whole.function.arguments


def test_tool_results_in_the_history(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=120, temperature=0)
    call = r.choices[0].message.tool_calls[0]
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"}]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=30, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    r = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none",
                                       max_tokens=30, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content


@pytest.mark.parametrize("extra,param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objectz"}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
])
def test_bad_tool_requests_are_400s(server, extra, param):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": ASK, "max_tokens": 8, **extra})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


class Weather(BaseModel):
    city: str = Field(max_length=30)
    temperature: int = Field(ge=-60, le=60)


def test_langchain_bind_tools_and_structured_output(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(model=MODEL, base_url=server.url + "/v1", api_key="unused", temperature=0,
                                      max_tokens=120, max_retries=0)
    bound = llm.bind_tools(TOOLS, tool_choice="get_weather", parallel_tool_calls=False)
    message = bound.invoke("What is the weather in Paris?")
    assert len(message.tool_calls) == 1 and message.tool_calls[0]["name"] == "get_weather"
    jsonschema.validate(message.tool_calls[0]["args"], SCHEMAS["get_weather"])
    for method in ("json_schema", "function_calling"):
        result = llm.with_structured_output(Weather, method=method).invoke("The weather in Paris is 18 degrees.")
        assert isinstance(result, Weather)
