"""OpenAI request, response and error bodies (pydantic), and their mapping to SamplingParams.

Field ranges are checked here, so a bad value is a 400 naming the field before
anything reaches the engine. No field is ignored without a word: every field is
either implemented, or refused with a 400 that names it (unknown ones included);
the few OpenAI fields accepted without effect change nothing in the answer
(`user`, `metadata`, `safety_identifier`, `prompt_cache_key`: prefix caching is
automatic). Structured outputs come under the names clients use: OpenAI's
`response_format`, vLLM's `structured_outputs` and `guided_*`, SGLang's
`regex`/`ebnf`/`json_schema` and llama.cpp's `grammar`/`json_schema`.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from quadrant.sampling_params import SamplingParams, StructuredOutput


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage in every chunk is not sent; refused when true


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # always strict here: the grammar allows nothing else


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsParams(BaseModel):
    """vLLM's `structured_outputs` extension: exactly one of these."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class UnsupportedField(ValueError):
    """A known field set to something quadrant does not do: a 400 naming it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(default=None, max_length=1024)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Common extensions (vLLM, llama.cpp):
    top_k: int = Field(default=0, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    ignore_eos: bool = False
    # Disaggregation (quadrant/disagg/, vLLM's names): where the prompt's KV comes from or goes to,
    # and token ids in the answer (the router resumes a broken stream from them).
    kv_transfer_params: dict[str, Any] | None = None
    return_token_ids: bool = False
    stop_token_ids: list[int] | None = Field(default=None, max_length=64)  # vLLM
    # Structured outputs, under each family's name (one of them per request).
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsParams | None = None
    guided_json: dict[str, Any] | str | None = None  # vLLM before structured_outputs
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    regex: str | None = None  # SGLang
    ebnf: str | None = None  # SGLang
    json_schema: dict[str, Any] | str | None = None  # SGLang (text), llama.cpp (object)
    grammar: str | None = None  # llama.cpp: GBNF
    # OpenAI fields with no effect on the tokens (accepted, as OpenAI accepts them).
    metadata: dict[str, str] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    # OpenAI fields quadrant does not do: refused when set to anything that would change the answer.
    store: bool | None = None
    service_tier: str | None = None

    def unsupported(self) -> None:
        """UnsupportedField for the first field set to something quadrant would not honour."""
        if self.store:
            raise UnsupportedField("store", "quadrant does not store completions")
        if self.service_tier not in (None, "auto", "default"):
            raise UnsupportedField("service_tier", f"{self.service_tier!r} is not offered; use 'auto' or 'default'")
        if self.stream_options is not None and self.stream_options.continuous_usage_stats:
            raise UnsupportedField("stream_options.continuous_usage_stats", "usage is sent once, at the end")
        if self.stream_options is not None and not self.stream:
            raise UnsupportedField("stream_options", "only allowed when stream is true")

    def structured_output(self) -> StructuredOutput | None:
        """The one output constraint this request names (None: free text); UnsupportedField if several."""
        found: list[tuple[str, StructuredOutput]] = []

        def schema(value: dict[str, Any] | str) -> str:
            return value if isinstance(value, str) else json.dumps(value)

        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(("response_format", StructuredOutput("json_schema", '{"type": "object"}')))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise UnsupportedField("response_format.json_schema", "a json_schema response format needs its schema")
            found.append(("response_format", StructuredOutput("json_schema", schema(rf.json_schema.schema_))))
        so = self.structured_outputs
        if so is not None:
            named = [(k, v) for k, v in (("json", so.json_), ("regex", so.regex), ("choice", so.choice),
                                          ("grammar", so.grammar), ("json_object", so.json_object or None))
                     if v is not None]
            if len(named) != 1:
                raise UnsupportedField("structured_outputs", "give exactly one of json, regex, choice, grammar, "
                                                             "json_object")
            kind, value = named[0]
            found.append(("structured_outputs", _constraint(kind, value)))
        for param, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                            ("guided_grammar", "grammar"), ("regex", "regex"), ("ebnf", "grammar"),
                            ("json_schema", "json"), ("grammar", "grammar")):
            value = getattr(self, param)
            if value is not None:
                found.append((param, _constraint(kind, value)))
        if len(found) > 1:
            raise UnsupportedField(found[1][0], f"only one output constraint per request (already {found[0][0]})")
        return found[0][1] if found else None

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        # Each stop string is searched for after every token, on the engine's thread.
        if isinstance(v, list) and len(v) > 16:
            raise ValueError("at most 16 stop strings")
        return v

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                bias[int(key)] = value
            except ValueError:
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
        return SamplingParams(
            n=self.n,
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=self.seed,
            stop=stop,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias=bias,
            logprobs=logprobs,
            ignore_eos=self.ignore_eos,
            stop_token_ids=list(self.stop_token_ids or []),
        )


def _constraint(kind: str, value: Any) -> StructuredOutput:
    if kind == "json":
        return StructuredOutput("json_schema", value if isinstance(value, str) else json.dumps(value))
    if kind == "json_object":
        return StructuredOutput("json_schema", '{"type": "object"}')
    if kind == "choice":
        return StructuredOutput("choice", json.dumps(value))
    return StructuredOutput(kind, value)  # type: ignore[arg-type]


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    # OpenAI's default for completions; 0 with echo scores the prompt alone (lm-eval's loglikelihood).
    max_tokens: int | None = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False  # the prompt comes back before the completion (with its logprobs when asked)
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)  # vLLM: the prompt's, apart from echo
    best_of: int | None = Field(default=None, ge=1)
    suffix: str | None = None

    def unsupported(self) -> None:
        super().unsupported()
        if self.best_of is not None and self.best_of != self.n:
            raise UnsupportedField("best_of", "only best_of equal to n (every sample returned) is supported")
        if self.suffix:
            raise UnsupportedField("suffix", "insertion (fill-in-the-middle) is not supported")
        if self.max_tokens == 0 and not self.echo and self.prompt_logprobs is None:
            raise UnsupportedField("max_tokens", "0 is only for scoring the prompt (with echo or prompt_logprobs)")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    modalities: list[str] | None = None
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=128)  # serve/tool_calls.py
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # Known OpenAI fields for what quadrant does not do: refused by name when set.
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM: extra variables for the chat template

    def unsupported(self) -> None:
        super().unsupported()
        if self.modalities is not None and self.modalities != ["text"]:
            raise UnsupportedField("modalities", "only text output is supported")
        if self.functions or self.function_call is not None:
            raise UnsupportedField("functions" if self.functions else "function_call",
                                   "the deprecated function-calling fields are not supported; use tools and tool_choice")
        for name in ("audio", "prediction", "reasoning_effort", "verbosity", "web_search_options"):
            if getattr(self, name) is not None:
                raise UnsupportedField(name, "not supported by quadrant")


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
