"""The OpenAI-compatible HTTP server: FastAPI routes over AsyncLLM, served by uvicorn.

The server answers as soon as it starts; the model loads on a thread and
/health says 200 only once it is ready. Every failure that a request causes is
an OpenAI error body with a 4xx status; the engine keeps serving the others.
A guard in front of the routes checks the API key (constant-time) and the body
size; /health and /version stay open.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
import threading
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from quadrant import __version__
from quadrant.chat import ChatTemplateError
from quadrant.engine.async_engine import AsyncLLM, EngineDeadError
from quadrant.engine.engine import LLMEngine, PromptTooLongError
from quadrant.engine.request import CompletionOutput, RequestOutput
from quadrant.errors import QuadrantError
from quadrant.serve import protocol as P
from quadrant.serve.metrics import ServerMetrics
from quadrant.serve.streaming import sse, sse_done

log = logging.getLogger("quadrant.serve")
PUBLIC_PATHS = frozenset({"/health", "/version", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


@dataclass
class ServerConfig:
    model: str
    served_model_name: str | None = None  # the name clients send; default: `model`
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_queued_requests: int = 256  # beyond running + this many, new requests get 429
    max_body_bytes: int = 4 * 2**20
    shutdown_timeout: float = 30.0  # seconds to finish in-flight requests on SIGTERM
    engine_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_queued_requests < 0:
            raise ValueError("max_queued_requests must be >= 0")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be at least 1024")
        if not 0 < self.port < 65536:
            raise ValueError("port must be in 1..65535")

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = P.ErrorResponse(error=P.ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code))
        return JSONResponse(body.model_dump(), status_code=self.status, headers=self.headers)


def _error(status: int, message: str, type_: str, code: str | None = None) -> dict[str, Any]:
    return {"status": status, "body": {"error": {"message": message, "type": type_, "param": None, "code": code}}}


LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})


class GuardMiddleware:
    """Host, API key and body-size checks (plain ASGI, so streaming responses and disconnect
    detection pass through untouched). A server bound to loopback answers only requests
    addressed to a loopback name: a web page cannot reach it through DNS rebinding."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int, loopback_only: bool = False) -> None:
        self.app, self.api_key, self.max_body = app, api_key, max_body_bytes
        self.loopback_only = loopback_only

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        raw = dict(scope.get("headers", []))
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw.items()}
        if self.loopback_only:
            host = headers.get("host", "")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name.lower() not in LOOPBACK_HOSTS:
                return await _send_json(send, _error(403, f"host {host!r} is not allowed; this server only answers "
                                                     "loopback names (start it with --host to open it)",
                                                     "permission_error", "host_not_allowed"))
        if self.api_key and scope["path"] not in PUBLIC_PATHS:
            given = raw.get(b"authorization", b"")
            expected = f"Bearer {self.api_key}".encode()
            if not hmac.compare_digest(given, expected):
                return await _send_json(send, _error(401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                                                     "authentication_error", "invalid_api_key"))
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await _send_json(send, _error(413, f"request body over {self.max_body} bytes",
                                                 "invalid_request_error", "request_too_large"))
        if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
            # Chunked upload: read it here, bounded, and replay it to the app.
            chunks, total, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                total += len(chunks[-1])
                more = message.get("more_body", False)
                if total > self.max_body:
                    return await _send_json(send, _error(413, f"request body over {self.max_body} bytes",
                                                         "invalid_request_error", "request_too_large"))
            body, replayed = b"".join(chunks), False

            async def replay() -> dict:
                nonlocal replayed
                if replayed:
                    return await receive()
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}

            return await self.app(scope, replay, send)
        return await self.app(scope, receive, send)


async def _send_json(send: Any, err: dict[str, Any]) -> None:
    payload = json.dumps(err["body"]).encode()
    await send({"type": "http.response.start", "status": err["status"],
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


class ServerState:
    """What the routes share: the engine once loaded, admission counts, metrics."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.llm: AsyncLLM | None = None
        self.load_error: BaseException | None = None
        self.metrics = ServerMetrics()
        self.max_model_len = 0
        self.max_inflight = 0
        self.active = 0  # admitted requests not yet finished (the event loop is its only writer)
        self.engine_error: BaseException | None = None  # set when the engine died after loading
        self.on_fatal: Any = None  # set by serve(): stops the server (failed load, dead engine)

    def ready(self) -> AsyncLLM:
        if self.engine_error is not None:
            raise OpenAIError(503, f"the engine stopped: {self.engine_error}", "service_unavailable",
                              code="engine_dead")
        if self.llm is None:
            raise OpenAIError(503, "the model is still loading", "service_unavailable", code="model_loading",
                              headers={"Retry-After": "2"})
        return self.llm

    def engine_died(self, error: BaseException) -> None:
        """The engine can run no more steps (a worker process died): answer 503, then stop, exiting 1."""
        self.engine_error = error
        if self.on_fatal is not None:
            self.on_fatal()

    def check_model(self, name: str) -> None:
        if name not in (self.config.model_name, self.config.model):
            raise OpenAIError(404, f"the model {name!r} does not exist; this server serves {self.config.model_name!r}",
                              "invalid_request_error", param="model", code="model_not_found")

    def admit(self, count: int) -> None:
        """Reserve room for `count` prompts or refuse with 429; `release` gives it back."""
        if self.active + count > self.max_inflight:
            raise OpenAIError(429, "the server is at capacity; retry shortly", "rate_limit_error",
                              code="queue_full", headers={"Retry-After": "1"})
        self.active += count

    def release(self, count: int) -> None:
        self.active -= count

    def load(self) -> None:
        try:
            engine = LLMEngine.from_model(self.config.model, **self.config.engine_kwargs)
            self.max_model_len = engine.max_model_len
            self.max_inflight = engine.config.scheduler.max_num_seqs + self.config.max_queued_requests
            self.llm = AsyncLLM(engine, on_dead=self.engine_died)
            log.info("model %s loaded in %.1fs", self.config.model, engine.load_seconds)
        except BaseException as e:  # reported by /health and the CLI; the process then exits
            log.error("loading %s failed: %s", self.config.model, e)
            self.load_error = e
            if self.on_fatal is not None:
                self.on_fatal()


def build_app(config: ServerConfig) -> FastAPI:
    state = ServerState(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(target=state.load, name="quadrant-load", daemon=True)
        loader.start()
        yield
        if state.llm is not None:
            state.llm.shutdown()

    app = FastAPI(title="quadrant", version=__version__, lifespan=lifespan)
    app.state.quadrant = state
    app.add_middleware(GuardMiddleware, api_key=config.api_key, max_body_bytes=config.max_body_bytes,
                       loopback_only=config.host in ("127.0.0.1", "localhost", "::1"))

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        state.metrics.requests.labels(request.url.path, str(exc.status)).inc()
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, loc = "the request body is not valid JSON", []
        param = ".".join(loc) or None
        err = OpenAIError(400, f"{param}: {message}" if param else message, param=param, code="invalid_value")
        return await _openai_error(request, err)

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(request: Request, exc: EngineDeadError) -> JSONResponse:
        return await _openai_error(request, OpenAIError(503, str(exc), "service_unavailable", code="engine_dead"))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return await _openai_error(request, OpenAIError(500, f"internal error: {type(exc).__name__}", "server_error"))

    @app.get("/health")
    async def health() -> Response:
        if state.load_error is not None:
            return JSONResponse({"status": "error", "error": str(state.load_error)}, status_code=503)
        if state.llm is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        if not state.llm.is_running:
            return JSONResponse({"status": "error", "error": f"engine stopped: {state.engine_error}"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        if state.llm is not None:
            running, waiting, usage, hits, experts = await state.llm.call(
                lambda e: (len(e.scheduler.running), len(e.scheduler.waiting), e.kv.usage, e.kv.hit_rate,
                           e.expert_load()))
            state.metrics.set_engine_state(running, waiting, usage, hits)
            state.metrics.set_expert_load(experts)
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        state.metrics.requests.labels("/v1/models", "200").inc()
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": P.now(),
                                            "owned_by": "quadrant", "max_model_len": state.max_model_len or None}]}

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, request: Request) -> Response:
        llm = state.ready()
        state.check_model(body.model)
        prompts = _prompt_list(body.prompt)
        try:
            prompt_ids = await llm.call(lambda e: [e.encode(p) for p in prompts])
        except (QuadrantError, ValueError) as e:
            raise OpenAIError(400, str(e), param="prompt") from None
        max_tokens = _fit_context(prompt_ids, body.max_tokens, state.max_model_len, "prompt")
        params = _params(body, max_tokens, body.logprobs)
        return await _serve(request, state, llm, "/v1/completions", body, prompt_ids, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: P.ChatCompletionRequest, request: Request) -> Response:
        llm = state.ready()
        state.check_model(body.model)
        messages = [_message_dict(m, i) for i, m in enumerate(body.messages)]
        try:
            prompt_ids = [await llm.call(lambda e: e.chat_prompt(messages))]
        except (QuadrantError, ValueError) as e:  # ChatTemplateError included
            raise OpenAIError(400, str(e), param="messages") from None
        max_tokens = _fit_context(prompt_ids, body.max_completion_tokens or body.max_tokens, state.max_model_len,
                                  "messages")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = _params(body, max_tokens, logprobs)
        return await _serve(request, state, llm, "/v1/chat/completions", body, prompt_ids, params, chat=True)

    return app


def _prompt_list(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise OpenAIError(400, "prompt must not be empty", param="prompt")
    return prompts


def _message_dict(m: P.ChatMessage, index: int) -> dict[str, Any]:
    d = m.model_dump(exclude_none=True)
    if isinstance(m.content, list):
        texts = []
        for part in m.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise OpenAIError(400, f"messages[{index}]: only text content parts are supported",
                                  param=f"messages.{index}.content")
            texts.append(part["text"])
        d["content"] = "".join(texts)
    return d


def _fit_context(prompt_ids: list[list[int]], max_tokens: int | None, max_model_len: int, param: str) -> int:
    longest = max(len(p) for p in prompt_ids)
    room = max_model_len - longest
    if room < 1:
        raise OpenAIError(400, f"the prompt has {longest} tokens; this model's context holds {max_model_len}",
                          param=param, code="context_length_exceeded")
    if max_tokens is None:
        return room
    if longest + max_tokens > max_model_len:
        raise OpenAIError(400, f"prompt ({longest} tokens) + max_tokens ({max_tokens}) exceeds the context of "
                          f"{max_model_len} tokens", param="max_tokens", code="context_length_exceeded")
    return max_tokens


def _params(body: P._SamplingFields, max_tokens: int, logprobs: int | None):
    try:
        return body.sampling_params(max_tokens, logprobs)
    except ValueError as e:
        param = str(e).split(" ", 1)[0]
        raise OpenAIError(400, str(e), param=param) from None


async def _serve(request: Request, state: ServerState, llm: AsyncLLM, endpoint: str, body: P._SamplingFields,
                 prompt_ids: list[list[int]], params: Any, chat: bool) -> Response:
    tokenizer = llm.engine.tokenizer
    vocab = llm.engine.model_config.vocab_size
    if any(t >= vocab for t in params.logit_bias):
        raise OpenAIError(400, f"logit_bias token ids must be below {vocab}", param="logit_bias")
    num_seqs = len(prompt_ids) * params.n
    state.admit(num_seqs)
    rid = P.new_id("chatcmpl" if chat else "cmpl")
    streams = [llm.generate(ids, params) for ids in prompt_ids]
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    formatter = _Formatter(rid, state.config.model_name, chat, tokenizer, params.n)
    if body.stream:
        # Generation starts now, whether or not the client ever reads: the pumps hold the
        # reservation until they end (finished, failed, or cancelled on disconnect).
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(_pump(i, s, queue)) for i, s in enumerate(streams)]
        asyncio.gather(*tasks, return_exceptions=True).add_done_callback(lambda _: state.release(num_seqs))
        return StreamingResponse(_stream(state, endpoint, queue, len(tasks), prompt_ids, formatter, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                 background=BackgroundTask(_cancel, tasks))
    collectors = [asyncio.create_task(_collect(s, request)) for s in streams]
    try:
        finals = await asyncio.gather(*collectors)
    except _Disconnected:
        return Response(status_code=499)
    except ValueError as e:
        raise OpenAIError(400, str(e), param="prompt") from None
    except EngineDeadError as e:
        raise OpenAIError(503, str(e), "service_unavailable", code="engine_dead") from None
    except RuntimeError as e:  # this request failed inside the engine; the others go on
        raise OpenAIError(500, str(e), "server_error") from None
    finally:
        for task in collectors:  # one prompt failing ends its siblings too, before the release
            task.cancel()
        await asyncio.gather(*collectors, return_exceptions=True)
        state.release(num_seqs)
    for out in finals:
        _observe(state, out)
    state.metrics.requests.labels(endpoint, "200").inc()
    choices = [formatter.choice(i * params.n + c.index, c, final=True) for i, out in enumerate(finals) for c in out.outputs]
    completion_tokens = sum(len(c.token_ids) for out in finals for c in out.outputs)
    prompt_tokens = sum(len(p) for p in prompt_ids)
    return JSONResponse({
        "id": rid, "object": "chat.completion" if chat else "text_completion", "created": P.now(),
        "model": state.config.model_name, "choices": choices,
        "usage": P.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                         total_tokens=prompt_tokens + completion_tokens).model_dump(),
    })


class _Disconnected(Exception):
    pass


async def _collect(stream: AsyncGenerator[RequestOutput, None], request: Request) -> RequestOutput:
    last = None
    try:
        async for out in stream:
            last = out
            if await request.is_disconnected():
                raise _Disconnected
    finally:
        await stream.aclose()  # aborts the request if it did not finish
    assert last is not None
    return last


async def _pump(i: int, stream: AsyncGenerator[RequestOutput, None], queue: asyncio.Queue) -> None:
    try:
        async for out in stream:
            await queue.put((i, out))
    except Exception as e:  # noqa: BLE001 - reported to the client in the stream
        await queue.put((i, e))
    finally:
        await stream.aclose()  # aborts the request if it did not finish
        await queue.put((i, None))


async def _cancel(tasks: list[asyncio.Task]) -> None:
    for t in tasks:
        t.cancel()


async def _stream(state: ServerState, endpoint: str, queue: asyncio.Queue, num_streams: int,
                  prompt_ids: list[list[int]], formatter: "_Formatter", include_usage: bool) -> AsyncIterator[str]:
    n = formatter.n
    completion_tokens = 0
    status = "200"
    finished: set[int] = set()  # choices whose finish_reason has been sent
    try:
        if formatter.chat:
            for i in range(num_streams * n):
                yield sse(formatter.chunk(i, role=True))
        open_streams = num_streams
        while open_streams:
            i, item = await queue.get()
            if item is None:
                open_streams -= 1
                continue
            if isinstance(item, Exception):
                status = "500"
                yield sse({"error": {"message": f"generation failed: {item}", "type": "server_error",
                                     "param": None, "code": None}})
                continue
            for c in item.outputs:
                index = i * n + c.index
                newly_finished = c.finish_reason is not None and index not in finished
                if c.text_delta or c.token_ids_delta or newly_finished:
                    yield sse(formatter.chunk(index, output=c))
                if newly_finished:
                    finished.add(index)
            if item.finished:
                completion_tokens += sum(len(c.token_ids) for c in item.outputs)
                _observe(state, item)
        if include_usage:
            prompt_tokens = sum(len(p) for p in prompt_ids)
            yield sse({"id": formatter.rid, "object": formatter.chunk_object, "created": P.now(),
                       "model": formatter.model, "choices": [],
                       "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                 "total_tokens": prompt_tokens + completion_tokens}})
        yield sse_done()
    finally:
        state.metrics.requests.labels(endpoint, status).inc()


def _observe(state: ServerState, out: RequestOutput) -> None:
    m = out.metrics
    if "finished" in m:
        state.metrics.observe_finished(len(out.prompt_token_ids), sum(len(c.token_ids) for c in out.outputs),
                                       m["arrival"], m["first_token"], m["finished"])


@dataclass
class _Formatter:
    """Choices and chunks in the completions or the chat format, logprobs included."""

    rid: str
    model: str
    chat: bool
    tokenizer: Any
    n: int

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else str(token_id)

    def logprobs(self, records: list | None, text_offset: int = 0) -> dict[str, Any] | None:
        if records is None:
            return None
        if self.chat:
            return {"content": [{
                "token": self._token(r.token_id), "logprob": r.logprob,
                "bytes": list(self._token(r.token_id).encode()),
                "top_logprobs": [{"token": self._token(t), "logprob": lp, "bytes": list(self._token(t).encode())}
                                 for t, lp in r.top],
            } for r in records]}
        tokens = [self._token(r.token_id) for r in records]
        offsets, pos = [], text_offset
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": [r.logprob for r in records],
                "top_logprobs": [{self._token(t): lp for t, lp in r.top} for r in records], "text_offset": offsets}

    def choice(self, index: int, c: CompletionOutput, final: bool) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "finish_reason": c.finish_reason,
                                  "logprobs": self.logprobs(c.logprobs)}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": c.text}
        else:
            choice["text"] = c.text
        return choice

    def chunk(self, index: int, output: CompletionOutput | None = None, role: bool = False) -> dict[str, Any]:
        assert role or output is not None
        text = output.text_delta if output is not None else ""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {"content": text}
            choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": None, "logprobs": None}
        else:
            choice = {"index": index, "text": text, "finish_reason": None, "logprobs": None}
        if output is not None:
            choice["finish_reason"] = output.finish_reason
            if output.logprobs_delta:
                choice["logprobs"] = self.logprobs(output.logprobs_delta)
        return {"id": self.rid, "object": self.chunk_object, "created": P.now(), "model": self.model,
                "choices": [choice]}


def serve(config: ServerConfig) -> int:
    """Run the server until SIGINT/SIGTERM; in-flight requests get `shutdown_timeout` seconds to finish."""
    import uvicorn

    app = build_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="info",
                                           timeout_graceful_shutdown=max(1, round(config.shutdown_timeout))))
    app.state.quadrant.on_fatal = lambda: setattr(server, "should_exit", True)
    # uvicorn handles SIGINT/SIGTERM (drain, then stop) and afterwards re-raises the signal
    # into the handler that was there before it; make that a no-op so a drained exit is 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    state: ServerState = app.state.quadrant
    return 1 if state.load_error is not None or state.engine_error is not None else 0
