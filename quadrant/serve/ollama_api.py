"""Ollama's API on the same port: /api/generate, /api/chat, /api/embed, /api/tags, /api/show, /api/ps,
/api/pull and /api/version, so Ollama's clients (the official `ollama` Python library, Open WebUI,
editors' plugins) work unchanged.

Streams are NDJSON, as Ollama sends them; errors are `{"error": "..."}` with a 4xx/5xx status.
`options` map onto SamplingParams (num_predict, temperature, top_k, top_p, min_p, seed, stop,
repeat_penalty, presence_penalty, frequency_penalty, num_ctx); any other option is a 400 that names
it, never silently dropped. `format` is structured output (json or a schema), tools go through
serve/tool_calls.py. This server pins the one model it serves: `keep_alive` cannot unload it
(keep_alive 0 is refused), and a request for another model is a 404.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from quadrant import __version__
from quadrant.engine.structured import GrammarError
from quadrant.errors import QuadrantError
from quadrant.loader import store
from quadrant.sampling_params import SamplingParams, StructuredOutput
from quadrant.serve.admission import ServerState
from quadrant.serve.embeddings_api import embed
from quadrant.serve.errors import OpenAIError
from quadrant.serve.model_pool import ModelPool, parse_keep_alive
from quadrant.serve.tool_calls import ToolCalling, ToolError

_OPTIONS = {"num_predict", "temperature", "top_k", "top_p", "min_p", "seed", "stop", "repeat_penalty",
            "presence_penalty", "frequency_penalty", "num_ctx"}


class OllamaError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    options: dict[str, Any] | None = None
    format: str | dict[str, Any] | None = None
    keep_alive: float | str | None = None
    stream: bool = True
    think: bool | str | None = None


class GenerateRequest(_Base):
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool | None = None
    images: list[Any] | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: str
    content: str | None = None
    images: list[Any] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None
    thinking: str | None = None


class ChatRequest(_Base):
    messages: list[ChatMessage] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    input: str | list[str] | None = None
    prompt: str | None = None  # /api/embeddings, the older form
    truncate: bool | None = None
    options: dict[str, Any] | None = None
    keep_alive: float | str | None = None
    dimensions: int | None = None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _parse(model: type[BaseModel], body: Any) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        why = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
        raise OllamaError(400, f"{where}: {why}" if where else why) from None


def sampling_params(options: dict[str, Any] | None, room: int, max_model_len: int) -> tuple[SamplingParams, int]:
    """(SamplingParams, the request's context limit) from Ollama options; OllamaError(400) names a bad one."""
    options = dict(options or {})
    unknown = sorted(k for k in options if k not in _OPTIONS and not (k == "mirostat" and not options[k]))
    if unknown:
        raise OllamaError(400, f"options.{unknown[0]}: not supported by quadrant (supported: {', '.join(sorted(_OPTIONS))})")
    num_ctx = options.get("num_ctx") or max_model_len
    if not isinstance(num_ctx, int) or num_ctx < 1:
        raise OllamaError(400, "options.num_ctx: must be a positive integer")
    num_predict = options.get("num_predict", -1)
    if not isinstance(num_predict, int) or num_predict < -2:
        raise OllamaError(400, "options.num_predict: must be an integer >= -2")
    stop = options.get("stop") or []
    if not isinstance(stop, (str, list)):
        raise OllamaError(400, "options.stop: must be a string or a list of strings")
    seed = options.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise OllamaError(400, "options.seed: must be an integer")
    try:
        params = SamplingParams(
            max_tokens=room if num_predict < 0 else min(num_predict, room),
            temperature=_number(options, "temperature", 0.8), top_k=int(_number(options, "top_k", 40, int)),
            top_p=_number(options, "top_p", 0.9), min_p=_number(options, "min_p", 0.0),  # Ollama's defaults
            seed=seed, stop=[stop] if isinstance(stop, str) else list(stop),
            repetition_penalty=_number(options, "repeat_penalty", 1.1),
            presence_penalty=_number(options, "presence_penalty", 0.0),
            frequency_penalty=_number(options, "frequency_penalty", 0.0))
    except ValueError as e:  # SamplingParams names the field (its own name for repeat_penalty)
        raise OllamaError(400, f"options: {e}") from None
    return params, min(num_ctx, max_model_len)


def _number(options: dict[str, Any], name: str, default: float, kind: type = float) -> float:
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise OllamaError(400, f"options.{name}: must be {'an integer' if kind is int else 'a number'}")
    return float(value)


def _format(fmt: str | dict[str, Any] | None) -> StructuredOutput | None:
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return StructuredOutput("json_schema", '{"type": "object"}')
    if isinstance(fmt, dict):
        return StructuredOutput("json_schema", json.dumps(fmt))
    raise OllamaError(400, f"format: must be 'json' or a JSON schema, got {fmt!r}")


def add_ollama_routes(app: FastAPI, pool: ModelPool) -> None:
    @app.exception_handler(OllamaError)
    async def _ollama_error(request: Request, exc: OllamaError) -> JSONResponse:
        pool.metrics.requests.labels(request.url.path, str(exc.status)).inc()
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    async def get(name: str, keep_alive: float | str | None = None) -> ServerState:
        """The model's engine, loaded on demand; keep_alive 0 on the pinned primary is refused."""
        resolved = pool.resolve(name)
        if _unloads(keep_alive) and resolved is not None and resolved[0] == pool.config.model_name:
            raise OllamaError(400, "keep_alive: the server's primary model stays loaded; it cannot unload it")
        try:
            state = await pool.get(name, keep_alive)
            state.ready()
        except OpenAIError as e:
            raise OllamaError(e.status, e.message) from None
        return state

    def details(state: ServerState) -> dict[str, Any]:
        engine = state.ready().engine
        info = engine.source.describe()
        params = info.get("parameters") or 0
        return {"parent_model": "", "format": "gguf" if engine.source.gguf is not None else "safetensors",
                "family": info["architecture"], "families": [info["architecture"]],
                "parameter_size": f"{params / 1e9:.1f}B" if params >= 1e9 else f"{params / 1e6:.0f}M",
                "quantization_level": str(info.get("quantization") or "")}

    @app.get("/api/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/api/tags")
    async def tags() -> dict[str, Any]:
        loaded = {store.canonical_name(s.name): s.state for s in pool.loaded()}
        stored = {m.name: m for m in store.list_models()}
        models = []
        for name in pool.servable():
            m = stored.get(store.canonical_name(name))
            state = loaded.get(store.canonical_name(name))
            models.append({"name": name, "model": name, "size": m.size if m else 0, "digest": m.sha256 if m else "",
                           "modified_at": datetime.fromtimestamp(m.pulled_at, timezone.utc).isoformat() if m
                           else _now(), "details": details(state) if state is not None else {}})
        return {"models": models}

    @app.post("/api/show")
    async def show(request: Request) -> dict[str, Any]:
        body = await _json(request)
        name = body.get("model") or body.get("name")
        if not isinstance(name, str):
            raise OllamaError(400, "model: required")
        state = await get(name)
        engine = state.ready().engine
        info = engine.source.describe()
        tok = engine.tokenizer
        capabilities = ["completion", "embedding"] + (["tools"] if tok is not None and tok.chat_template else [])
        return {"license": info.get("license") or "", "modelfile": "", "parameters": "",
                "template": (tok.chat_template if tok is not None else None) or "",
                "details": details(state), "capabilities": capabilities,
                "model_info": {"general.architecture": info["architecture"],
                               "general.parameter_count": info.get("parameters"),
                               f"{info['architecture']}.context_length": state.max_model_len,
                               f"{info['architecture']}.embedding_length": info["embedding length"],
                               f"{info['architecture']}.block_count": info["layers"]},
                "modified_at": _now()}

    @app.get("/api/ps")
    async def ps() -> dict[str, Any]:
        out = []
        for slot in pool.loaded():
            ref = slot.state.config.model
            stored = store.find_stored(ref) if not store.looks_like_path(ref) else None
            expires = slot.expires_at
            out.append({"name": slot.name, "model": slot.name, "size": stored.size if stored else 0,
                        "digest": stored.sha256 if stored else "", "details": details(slot.state),
                        "expires_at": "9999-12-31T23:59:59Z" if expires is None
                        else datetime.fromtimestamp(expires, timezone.utc).isoformat(),
                        "size_vram": 0, "context_length": slot.state.max_model_len,
                        "running_requests": slot.state.active, "memory_bytes": slot.state.memory_bytes})
        return {"models": out}

    @app.post("/api/pull")
    async def pull(request: Request) -> Response:
        body = await _json(request)
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            raise OllamaError(400, "model: required")
        if name not in store.CATALOGUE and store.canonical_name(name) not in store.CATALOGUE:
            raise OllamaError(404, f"pull model manifest: '{name}' is not in quadrant's catalogue "
                                   f"({', '.join(sorted(store.CATALOGUE))})")
        entry = store.CATALOGUE[store.canonical_name(name)]

        async def progress() -> AsyncIterator[dict[str, Any]]:
            yield {"status": "pulling manifest"}
            yield {"status": f"pulling {entry.sha256[:12]}", "digest": f"sha256:{entry.sha256}"}
            try:
                stored = await asyncio.to_thread(store.pull, name, True)
            except QuadrantError as e:
                yield {"error": str(e)}
                return
            yield {"status": f"pulling {entry.sha256[:12]}", "digest": f"sha256:{entry.sha256}",
                   "total": stored.size, "completed": stored.size}
            yield {"status": "verifying sha256 digest"}
            yield {"status": "writing manifest"}
            yield {"status": "success"}

        return await _stream_or_last(progress(), body.get("stream", True) is not False)

    @app.post("/api/generate")
    async def generate(request: Request) -> Response:
        body: GenerateRequest = _parse(GenerateRequest, await _json(request))
        for field in ("images", "template", "suffix", "think"):
            if getattr(body, field):
                raise OllamaError(400, f"{field}: not supported by quadrant")
        state = await get(body.model, body.keep_alive)
        llm = state.ready()
        if not body.prompt and not body.context:  # Ollama's way to load (or, keep_alive 0, unload) a model
            return _answer(body.stream, _load_answer(pool, body.model, body.keep_alive, {"response": ""}))
        prompt = body.prompt or ""
        try:
            if body.raw or llm.engine.tokenizer is None or not llm.engine.tokenizer.chat_template:
                text_ids = await llm.call(lambda e: e.encode(prompt)) if prompt else []
            else:
                messages = ([{"role": "system", "content": body.system}] if body.system else []) + \
                           [{"role": "user", "content": prompt}]
                text_ids = await llm.call(lambda e: e.chat_prompt(messages))
        except (QuadrantError, ValueError) as e:
            raise OllamaError(400, str(e)) from None
        ids = list(body.context or []) + text_ids
        params = await _params(state, llm, body.options, ids, _format(body.format))
        return await _run(state, llm, body.model, ids, params, body.stream, chat=False, tools=None)

    @app.post("/api/chat")
    async def chat(request: Request) -> Response:
        body: ChatRequest = _parse(ChatRequest, await _json(request))
        if body.think:
            raise OllamaError(400, "think: not supported by quadrant")
        if any(m.images for m in body.messages):
            raise OllamaError(400, "messages: images are not supported by quadrant")
        state = await get(body.model, body.keep_alive)
        llm = state.ready()
        if not body.messages:
            return _answer(body.stream, _load_answer(pool, body.model, body.keep_alive,
                                                     {"message": {"role": "assistant", "content": ""}}))
        tok = llm.engine.tokenizer
        try:
            tools = ToolCalling.parse(body.tools, None, True, tok.chat_template if tok is not None else None)
        except ToolError as e:
            raise OllamaError(400, str(e)) from None
        messages = [_openai_message(m) for m in body.messages]
        extra: dict[str, Any] = {}
        if tools is not None:
            messages, extra = tools.messages(messages), tools.template_kwargs()
        try:
            ids = await llm.call(lambda e: e.chat_prompt(messages, **extra))
        except (QuadrantError, ValueError) as e:
            raise OllamaError(400, f"messages: {e}") from None
        params = await _params(state, llm, body.options, ids, _format(body.format))
        if body.logprobs:
            params = replace(params, logprobs=body.top_logprobs or 0)
        return await _run(state, llm, body.model, ids, params, body.stream, chat=True, tools=tools)

    async def _embed(request: Request, legacy: bool) -> dict[str, Any]:
        body: EmbedRequest = _parse(EmbedRequest, await _json(request))
        state = await get(body.model, body.keep_alive)
        if body.options:
            raise OllamaError(400, f"options.{next(iter(body.options))}: embeddings take no options")
        start = time.perf_counter_ns()
        inputs: list = [body.prompt] if legacy else ([body.input] if isinstance(body.input, str) else body.input or [])
        if not inputs or inputs == [None]:
            raise OllamaError(400, "prompt: required" if legacy else "input: required")
        try:
            vectors, tokens = await embed(state, inputs, "prompt" if legacy else "input")
        except OpenAIError as e:
            raise OllamaError(e.status, e.message) from None
        if body.dimensions is not None and body.dimensions != len(vectors[0]):
            raise OllamaError(400, f"dimensions: this model's embeddings have {len(vectors[0])}")
        if legacy:
            return {"embedding": vectors[0]}
        return {"model": body.model, "embeddings": vectors, "total_duration": time.perf_counter_ns() - start,
                "load_duration": 0, "prompt_eval_count": tokens}

    @app.post("/api/embed")
    async def embed_route(request: Request) -> dict[str, Any]:
        return await _embed(request, legacy=False)

    @app.post("/api/embeddings")
    async def embeddings_route(request: Request) -> dict[str, Any]:
        return await _embed(request, legacy=True)

    async def _params(state: ServerState, llm: Any, options: dict[str, Any] | None, ids: list[int],
                      fmt: StructuredOutput | None) -> SamplingParams:
        params, limit = sampling_params(options, max(state.max_model_len - len(ids), 1), state.max_model_len)
        if len(ids) >= limit:
            raise OllamaError(400, f"the prompt has {len(ids)} tokens; the context (num_ctx) holds {limit}")
        params = replace(params, max_tokens=min(params.max_tokens, limit - len(ids)))
        if fmt is not None:
            structured = llm.engine.structured
            if structured is None:
                raise OllamaError(400, "format: structured outputs need the model's tokenizer")
            try:
                await asyncio.to_thread(structured.compile, fmt)
            except GrammarError as e:
                raise OllamaError(400, f"format: {e}") from None
            params = replace(params, structured=fmt)
        return params


def _unloads(keep_alive: Any) -> bool:
    """Whether a request's keep_alive says to unload (0 in any unit); a malformed one is the pool's 400."""
    try:
        return keep_alive is not None and parse_keep_alive(keep_alive, 1.0) == 0
    except ValueError:
        return False


def _load_answer(pool: ModelPool, model: str, keep_alive: Any, fields: dict[str, Any]) -> dict[str, Any]:
    """The answer to an empty request: the model is loaded now; with keep_alive 0 it unloads instead."""
    reason = "load"
    if _unloads(keep_alive):
        resolved = pool.resolve(model)
        if resolved is not None:
            pool.unload(resolved[0])
            reason = "unload"
    return {"model": model, "created_at": _now(), **fields, "done": True, "done_reason": reason}


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"{}")
    except json.JSONDecodeError:
        raise OllamaError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise OllamaError(400, "the request body must be a JSON object")
    return body


def _openai_message(m: ChatMessage) -> dict[str, Any]:
    """An Ollama message as the OpenAI-shaped dict chat templates and tool_calls.py read."""
    out: dict[str, Any] = {"role": m.role, "content": m.content or ""}
    if m.tool_calls:
        out["tool_calls"] = [{"type": "function", "function": {
            "name": c.get("function", {}).get("name"),
            "arguments": json.dumps(c.get("function", {}).get("arguments", {}))}} for c in m.tool_calls]
    if m.tool_name:
        out["name"] = m.tool_name
    return out


def _ndjson(items: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def lines() -> AsyncIterator[str]:
        async for item in items:
            yield json.dumps(item, ensure_ascii=False) + "\n"
    return StreamingResponse(lines(), media_type="application/x-ndjson")


def _answer(stream: bool, payload: dict[str, Any]) -> Response:
    if stream:
        async def one() -> AsyncIterator[dict[str, Any]]:
            yield payload
        return _ndjson(one())
    return JSONResponse(payload)


async def _run(state: ServerState, llm: Any, model: str, ids: list[int], params: SamplingParams, stream: bool,
               chat: bool, tools: ToolCalling | None) -> Response:
    """Generate, as Ollama's NDJSON stream or one JSON answer with its timings."""
    state.admit(1)
    start = time.perf_counter_ns()
    try:
        outputs = llm.generate(ids, params)
    except (QuadrantError, ValueError) as e:
        state.release(1)
        raise OllamaError(400, str(e)) from None
    splitter = tools.stream() if tools is not None and chat else None

    def piece(text: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        base: dict[str, Any] = {"model": model, "created_at": _now()}
        if chat:
            base["message"] = {"role": "assistant", "content": text, **(extra or {})}
        else:
            base["response"] = text
        return base

    async def items() -> AsyncIterator[dict[str, Any]]:
        first_token = None
        last = None
        try:
            async for out in outputs:
                last = out
                first_token = first_token or time.perf_counter_ns()
                c = out.outputs[0]
                text = c.text_delta
                calls: list[dict[str, Any]] = []
                if splitter is not None:
                    text, deltas = splitter.feed(text, final=c.finish_reason is not None)
                    calls = _whole_calls(deltas)
                if stream and (text or calls):
                    yield piece(text, {"tool_calls": calls} if calls else None)
        except RuntimeError as e:
            yield {"error": f"generation failed: {e}"}
            return
        finally:
            await outputs.aclose()
            state.release(1)
        assert last is not None
        c = last.outputs[0]
        end = time.perf_counter_ns()
        done = piece("")
        if not stream:  # the whole answer in one object
            if chat and tools is not None:
                content, found = tools.extract(c.text)
                done["message"] = {"role": "assistant", "content": content or "",
                                   **({"tool_calls": [{"function": {"name": t.name,
                                                                    "arguments": json.loads(t.arguments)}}
                                                      for t in found]} if found else {})}
            elif chat:
                done["message"]["content"] = c.text
            else:
                done["response"] = c.text
        done.update(done=True, done_reason=c.finish_reason or "stop", total_duration=end - start, load_duration=0,
                    prompt_eval_count=len(ids), prompt_eval_duration=(first_token or end) - start,
                    eval_count=len(c.token_ids), eval_duration=end - (first_token or end))
        if not chat:
            done["context"] = ids + list(c.token_ids)
        yield done

    return await _stream_or_last(items(), stream)


async def _stream_or_last(items: AsyncIterator[dict[str, Any]], stream: bool) -> Response:
    """NDJSON of every item, or (stream false) the last one alone; an error item becomes a 500."""
    if stream:
        return _ndjson(items)
    last: dict[str, Any] = {}
    async for item in items:
        last = item
    if "error" in last:
        raise OllamaError(500, last["error"])
    return JSONResponse(last)


def _whole_calls(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ollama sends each tool call whole, its arguments an object: rebuild them from OpenAI-style deltas."""
    calls: list[dict[str, Any]] = []
    for d in deltas:
        if "id" in d:
            calls.append({"function": {"name": d["function"]["name"], "arguments": ""}})
        else:
            calls[-1]["function"]["arguments"] += d["function"]["arguments"]
    for c in calls:
        c["function"]["arguments"] = json.loads(c["function"]["arguments"] or "{}")
    return calls
