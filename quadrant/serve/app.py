"""The OpenAI-compatible HTTP server: FastAPI routes over AsyncLLM, served by uvicorn.

The server answers as soon as it starts; the model loads on a thread and
/health says 200 only once it is ready. Every failure that a request causes is
an OpenAI error body with a 4xx status; the engine keeps serving the others.
This module holds the routes, their error handlers and serve(); the guard,
admission, formatting and streaming live in the modules imported below.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.background import BackgroundTask

from quadrant import __version__
from quadrant.engine.async_engine import AsyncLLM, EngineDeadError
from quadrant.engine.structured import GrammarError
from quadrant.errors import QuadrantError
from quadrant.sampling_params import StructuredOutput
from quadrant.serve import protocol as P
from quadrant.serve.admission import ServerState
from quadrant.serve.config import ServerConfig
from quadrant.serve.errors import OpenAIError, install_error_handlers
from quadrant.serve.embeddings_api import add_embedding_routes
from quadrant.serve.guard import GuardMiddleware
from quadrant.serve.model_pool import ModelPool
from quadrant.serve.ollama_api import add_ollama_routes
from quadrant.serve.openai_format import Formatter
from quadrant.serve.streaming import Disconnected, cancel, collect, pump, sse_events
from quadrant.serve.tokenizer_api import add_tokenizer_routes
from quadrant.serve.tool_calls import ToolCalling, ToolError

__all__ = ["ServerConfig", "build_app", "serve"]

log = logging.getLogger("quadrant.serve")
WEB_ROOT = Path(__file__).parent / "web"


def build_app(config: ServerConfig) -> FastAPI:
    pool = ModelPool(config)
    state = pool.primary  # the model named on the command line: loaded at start, never unloaded

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(target=state.load, name="quadrant-load", daemon=True)
        loader.start()
        reaper = asyncio.create_task(pool.reap_forever())
        yield
        reaper.cancel()
        pool.shutdown()

    app = FastAPI(title="quadrant", version=__version__, lifespan=lifespan)
    app.state.quadrant = state
    app.state.models = pool
    app.add_middleware(GuardMiddleware, api_key=config.api_key, max_body_bytes=config.max_body_bytes,
                       loopback_only=config.host in ("127.0.0.1", "localhost", "::1"))

    _openai_error = install_error_handlers(
        app, lambda path, status: state.metrics.requests.labels(path, status).inc(), log)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        message, code = first.get("msg", "invalid request"), "invalid_value"
        if first.get("type") == "json_invalid":
            message, loc = "the request body is not valid JSON", []
        elif first.get("type") == "extra_forbidden":  # never silently ignored (serve/protocol.py)
            message, code = "unknown field: quadrant does not support it", "unsupported_parameter"
        param = ".".join(loc) or None
        err = OpenAIError(400, f"{param}: {message}" if param else message, param=param, code=code)
        return await _openai_error(request, err)

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(request: Request, exc: EngineDeadError) -> JSONResponse:
        return await _openai_error(request, OpenAIError(503, str(exc), "service_unavailable", code="engine_dead"))

    @app.get("/health")
    async def health() -> Response:
        if state.load_error is not None:
            return JSONResponse({"status": "error", "error": str(state.load_error)}, status_code=503)
        if state.llm is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        if not state.llm.is_running:
            return JSONResponse({"status": "error", "error": f"engine stopped: {state.engine_error}"}, status_code=503)
        connector = state.llm.engine.connector
        if connector is not None and connector.server is not None:  # a router sends overlapped transfers here
            return JSONResponse({"status": "ok", "kv": {"host": connector.config.kv_host, "port": connector.kv_port}})
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        if state.llm is not None:
            running, waiting, usage, hits, experts, transfer, spec, steps = await state.llm.call(
                lambda e: (len(e.scheduler.running), len(e.scheduler.waiting) + len(e.scheduler.loading), e.kv.usage,
                           e.kv.hit_rate, e.expert_load(), e.connector.snapshot() if e.connector else None,
                           replace(e.spec_stats) if e.proposer is not None else None,
                           (e.num_steps, e.num_overlapped_steps)))
            state.metrics.set_engine_state(running, waiting, usage, hits, *steps)
            state.metrics.set_expert_load(experts)
            if spec is not None:
                state.metrics.set_speculation(spec)
            if transfer is not None:
                state.metrics.set_kv_transfer(transfer)
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    # The chat page: static files of the package, no CDN (serve/web/).
    app.mount("/web", StaticFiles(directory=WEB_ROOT), name="web")

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(WEB_ROOT / "index.html")

    add_tokenizer_routes(app, pool)
    add_embedding_routes(app, pool)
    add_ollama_routes(app, pool)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        state.metrics.requests.labels("/v1/models", "200").inc()
        loaded = {s.name: s.state.max_model_len for s in pool.loaded()}
        return {"object": "list", "data": [{"id": name, "object": "model", "created": P.now(), "owned_by": "quadrant",
                                            "max_model_len": loaded.get(name) or None} for name in pool.servable()]}

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, request: Request) -> Response:
        state = await pool.get(body.model)
        llm = state.ready()
        with _refusing_transfer_on_error(llm, body):
            return await _completion(request, state, llm, body)

    async def _completion(request: Request, state: ServerState, llm: AsyncLLM, body: P.CompletionRequest) -> Response:
        _check_supported(body)
        prompts = _prompt_list(body.prompt)
        try:
            prompt_ids = await llm.call(lambda e: [e.encode(p) for p in prompts])
        except (QuadrantError, ValueError) as e:
            raise OpenAIError(400, str(e), param="prompt") from None
        max_tokens = _fit_context(prompt_ids, body.max_tokens, state.max_model_len, "prompt")
        params = _params(body, max_tokens, body.logprobs)
        # echo with logprobs returns the prompt's logprobs too (lm-eval's loglikelihood reads them).
        prompt_logprobs = body.prompt_logprobs if body.prompt_logprobs is not None else \
            (body.logprobs if body.echo and body.logprobs is not None else None)
        params = replace(params, prompt_logprobs=prompt_logprobs, structured=await _compile(llm, body))
        return await _serve(request, state, llm, "/v1/completions", body, prompt_ids, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: P.ChatCompletionRequest, request: Request) -> Response:
        state = await pool.get(body.model)
        llm = state.ready()
        with _refusing_transfer_on_error(llm, body):
            return await _chat_completion(request, state, llm, body)

    async def _chat_completion(request: Request, state: ServerState, llm: AsyncLLM,
                               body: P.ChatCompletionRequest) -> Response:
        _check_supported(body)
        messages = [_message_dict(m, i) for i, m in enumerate(body.messages)]
        extra = _template_kwargs(body.chat_template_kwargs)
        tools = _tool_calling(body, llm)
        if tools is not None:
            messages = tools.messages(messages)
            extra.update(tools.template_kwargs())
        try:
            prompt_ids = [await llm.call(lambda e: e.chat_prompt(messages, **extra))]
        except (QuadrantError, ValueError) as e:  # ChatTemplateError included
            raise OpenAIError(400, str(e), param="messages") from None
        max_tokens = _fit_context(prompt_ids, body.max_completion_tokens or body.max_tokens, state.max_model_len,
                                  "messages")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        constraint = tools.constraint() if tools is not None else None
        if constraint is not None and body.structured_output() is not None:
            raise OpenAIError(400, "tool_choice: a required or named tool call already fixes the output's form; "
                                   "drop response_format", param="tool_choice")
        params = replace(_params(body, max_tokens, logprobs), structured=await _compile(llm, body, constraint))
        return await _serve(request, state, llm, "/v1/chat/completions", body, prompt_ids, params, chat=True,
                            tools=tools)

    return app


@contextmanager
def _refusing_transfer_on_error(llm: AsyncLLM, body: P._SamplingFields) -> Iterator[None]:
    """A prefill worker that turns away an overlapped prefill (the router already sent the decode worker
    its transfer id) says so to the pulls parked for it, which then recompute at once."""
    try:
        yield
    except BaseException:
        kv = body.kv_transfer_params
        connector = llm.engine.connector
        if connector is not None and isinstance(kv, dict) and kv.get("do_remote_decode") and kv.get("transfer_id"):
            connector.refuse(str(kv["transfer_id"]))  # (a no-op if the engine took it: its lease ends with it)
        raise


def _check_supported(body: P._SamplingFields) -> None:
    try:
        body.unsupported()
    except P.UnsupportedField as e:
        raise OpenAIError(400, str(e), param=e.param, code="unsupported_parameter") from None


def _tool_calling(body: P.ChatCompletionRequest, llm: AsyncLLM) -> ToolCalling | None:
    tokenizer = llm.engine.tokenizer
    try:
        return ToolCalling.parse(body.tools, body.tool_choice, body.parallel_tool_calls,
                                 tokenizer.chat_template if tokenizer is not None else None)
    except ToolError as e:
        raise OpenAIError(400, str(e), param=e.param, code="invalid_value") from None


async def _compile(llm: AsyncLLM, body: P._SamplingFields, spec: StructuredOutput | None = None
                   ) -> StructuredOutput | None:
    """The request's output constraint (`spec`, else the one its fields name), compiled here, off the
    engine thread (the engine then copies the cached matcher); a bad schema, regex or grammar is a
    400 before the engine sees it."""
    try:
        spec = spec or body.structured_output()
    except P.UnsupportedField as e:
        raise OpenAIError(400, str(e), param=e.param, code="unsupported_parameter") from None
    if spec is None:
        return None
    structured = llm.engine.structured
    if structured is None:
        raise OpenAIError(400, "structured outputs need the model's tokenizer", param="response_format")
    try:
        await asyncio.to_thread(structured.compile, spec)
    except GrammarError as e:
        param = _constraint_param(body)
        raise OpenAIError(400, f"{param}: {e}", param=param, code="invalid_value") from None
    return spec


def _constraint_param(body: P._SamplingFields) -> str:
    for name in ("tools", "response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                 "guided_grammar", "regex", "ebnf", "json_schema", "grammar"):
        if getattr(body, name, None) is not None:
            return name
    return "response_format"


_RESERVED_TEMPLATE_NAMES = {"messages", "tools", "documents", "add_generation_prompt", "bos_token", "eos_token",
                            "unk_token", "pad_token"}


def _template_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    bad = sorted(set(kwargs or {}) & _RESERVED_TEMPLATE_NAMES)
    if bad:
        raise OpenAIError(400, f"chat_template_kwargs may not set {', '.join(bad)}", param="chat_template_kwargs")
    return dict(kwargs or {})


def _prompt_texts(body: P._SamplingFields, prompt_ids: list[list[int]], tokenizer: Any) -> list[str]:
    """Echo's prompt texts: as sent when they were text, else the ids decoded."""
    prompts = _prompt_list(getattr(body, "prompt", None))
    return [p if isinstance(p, str) else (tokenizer.decode(ids) if tokenizer is not None else "")
            for p, ids in zip(prompts, prompt_ids)]


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
                 prompt_ids: list[list[int]], params: Any, chat: bool, tools: ToolCalling | None = None) -> Response:
    tokenizer = llm.engine.tokenizer
    vocab = llm.engine.model_config.vocab_size
    if any(t >= vocab for t in params.logit_bias):
        raise OpenAIError(400, f"logit_bias token ids must be below {vocab}", param="logit_bias")
    kv_transfer = body.kv_transfer_params
    if kv_transfer is not None:
        if len(prompt_ids) > 1:
            raise OpenAIError(400, "kv_transfer_params takes one prompt per request", param="kv_transfer_params")
        if body.stream and isinstance(kv_transfer, dict) and kv_transfer.get("do_remote_decode"):
            raise OpenAIError(400, "a prefill for remote decode is not streamed: its answer carries the "
                                   "kv_transfer_params", param="stream")
        try:  # checked here too so that a stream never starts for a request the engine refuses
            llm.engine.parse_kv_transfer(kv_transfer, prompt_ids[0], params)
        except ValueError as e:
            raise OpenAIError(400, str(e), param="kv_transfer_params") from None
    num_seqs = len(prompt_ids) * params.n
    state.admit(num_seqs)
    rid = P.new_id("chatcmpl" if chat else "cmpl")
    streams = [llm.generate(ids, params, kv_transfer=kv_transfer) for ids in prompt_ids]
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    echo = bool(getattr(body, "echo", False))
    prompt_texts = _prompt_texts(body, prompt_ids, tokenizer) if echo else []
    formatter = Formatter(rid, state.config.model_name, chat, tokenizer, params.n, body.return_token_ids, prompt_ids,
                          echo=echo, prompt_texts=prompt_texts,
                          prompt_logprobs=getattr(body, "prompt_logprobs", None) is not None,
                          tools=tools if tools is not None and tools.parses else None)
    if body.stream:
        # Generation starts now, whether or not the client ever reads: the pumps hold the
        # reservation until they end (finished, failed, or cancelled on disconnect).
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(pump(i, s, queue)) for i, s in enumerate(streams)]
        asyncio.gather(*tasks, return_exceptions=True).add_done_callback(lambda _: state.release(num_seqs))
        events = sse_events(state.metrics, endpoint, queue, len(tasks), prompt_ids, formatter, include_usage)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                 background=BackgroundTask(cancel, tasks))
    collectors = [asyncio.create_task(collect(s, request)) for s in streams]
    try:
        finals = await asyncio.gather(*collectors)
    except Disconnected:
        return Response(status_code=499)
    except ValueError as e:
        raise OpenAIError(400, str(e), param="prompt") from None
    except EngineDeadError as e:
        raise OpenAIError(503, str(e), "service_unavailable", code="engine_dead") from None
    except RuntimeError as e:  # this request failed inside the engine; the others go on
        if "KVTransferError" in str(e):  # --kv-load-failure-policy fail: the prefill side's KV is gone, not us
            raise OpenAIError(502, str(e), "server_error", code="kv_transfer_failed") from None
        raise OpenAIError(500, str(e), "server_error") from None
    finally:
        for task in collectors:  # one prompt failing ends its siblings too, before the release
            task.cancel()
        await asyncio.gather(*collectors, return_exceptions=True)
        state.release(num_seqs)
    for out in finals:
        state.metrics.observe_output(out)
    state.metrics.requests.labels(endpoint, "200").inc()
    response = formatter.completion(finals, sum(len(p) for p in prompt_ids))
    if finals[0].kv_transfer_params is not None:  # a prefill engine: where the decode engine pulls the KV
        response["kv_transfer_params"] = finals[0].kv_transfer_params
    return JSONResponse(response)


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
