"""The disaggregation router (`quadrant router`): OpenAI requests in, a prefill step then a decode step.

A prefill worker runs the prompt (max_tokens 1) and answers with kv_transfer_params; a decode worker
gets the client's body plus those params, and its answer (JSON, or SSE byte for byte) goes back to
the client. A 4xx from a worker is relayed; a failed worker is skipped until its health check passes
and the step retried on another; a decode stream that breaks mid-way is resumed from the token ids
already relayed. Worker choice: routing.py. Workers: `quadrant serve --role prefill|decode`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from quadrant import __version__
from quadrant.disagg.resume import (
    DONE, StreamTracker, decode_body, error_event, num_prompts, prefill_body, sse, sse_events,
)
from quadrant.disagg.router_config import RouterConfig, add_router_arguments, router_config_from_args
from quadrant.disagg.routing import (
    ROLES, PrefixCache, Role, Worker, WorkerPool, choose_decode, choose_prefill, normalize_url, parse_role,
    prompt_text,
)
from quadrant.serve.errors import OpenAIError, install_error_handlers
from quadrant.serve.guard import GuardMiddleware
from quadrant.serve.metrics import _LATENCY_BUCKETS, _TPOT_BUCKETS

__all__ = ["RouterConfig", "add_router_arguments", "build_router_app", "main", "router_config_from_args",
           "run_router"]

log = logging.getLogger("quadrant.router")
T = TypeVar("T")
_CONNECT_TIMEOUT = 5.0  # a worker that does not accept a connection in this long is down
_DISCONNECT_POLL = 0.5  # seconds between checks that a waiting client is still there
_SLOW_CHECKS = 3  # health checks in a row without an answer before a connected worker counts as down


class RouterMetrics:
    """The router's own Prometheus registry; worker gauges are summed per pool at scrape time."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("quadrant_router_requests", "Client requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.in_flight = Gauge("quadrant_router_requests_in_flight", "Client requests being served", registry=r)
        self.queue_depth = Gauge("quadrant_router_queue_depth",
                                 "Requests running plus waiting on the pool's healthy workers (last health check)",
                                 ["pool"], registry=r)
        self.healthy_workers = Gauge("quadrant_router_healthy_workers", "Workers passing health checks",
                                     ["pool"], registry=r)
        self.ttft = Histogram("quadrant_router_time_to_first_token_seconds",
                              "Arrival at the router to the first token relayed (streams)", registry=r,
                              buckets=_LATENCY_BUCKETS)
        self.tpot = Histogram("quadrant_router_time_per_output_token_seconds",
                              "Time per relayed token after the first (streams)", registry=r, buckets=_TPOT_BUCKETS)
        self.retries = Counter("quadrant_router_retries", "Steps retried on another worker", ["pool"], registry=r)
        self.worker_failures = Counter("quadrant_router_worker_failures",
                                       "Workers marked unhealthy (a failed step or health check)", ["pool"], registry=r)
        self.resumed_streams = Counter("quadrant_router_resumed_streams",
                                       "Decode streams resumed on another worker after breaking mid-way", registry=r)
        # Goodput (DistServe): streams whose TTFT and TPOT were both within the SLOs (--ttft-slo, --tpot-slo).
        self.streams_finished = Counter("quadrant_router_streams_finished", "Streams relayed to their end",
                                        registry=r)
        self.slo_attained = Counter("quadrant_router_slo_attained", "Streams within both the TTFT and TPOT SLOs",
                                    registry=r)


class WorkerFailed(Exception):
    """The worker could not do the step (connection, timeout, 5xx); another worker may."""


class Rejected(Exception):
    """A worker's 4xx: the client's fault, relayed as is."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"status {response.status_code}")
        self.status, self.content = response.status_code, response.content
        self.headers = {k: v for k, v in response.headers.items() if k.lower() == "retry-after"}
        try:
            self.message = str(json.loads(self.content)["error"]["message"])
        except (ValueError, KeyError, TypeError):
            self.message = self.content.decode("utf-8", "replace")[:200]

    def response(self) -> Response:
        return Response(self.content, self.status, headers=self.headers, media_type="application/json")


class ClientGone(Exception):
    pass


@dataclass
class Upstream:
    """An open decode stream; close() ends it (the worker aborts an unfinished request) exactly once."""

    worker: Worker
    response: httpx.Response
    closed: bool = False

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.worker.in_flight -= 1
        with anyio.CancelScope(shield=True):  # also when the relay is being cancelled (client gone)
            await self.response.aclose()


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _check_status(r: httpx.Response) -> None:
    # A decode worker whose KV pull failed (its policy: fail) is healthy: relay the error, keep the worker.
    if 400 <= r.status_code < 500 or (r.status_code == 502 and b"kv_transfer_failed" in r.content):
        raise Rejected(r)
    if not 200 <= r.status_code < 300:
        raise WorkerFailed(f"answered {r.status_code}: {r.text[:200]}")


class RouterState:
    """What the routes share: the pools, the prefix cache, the HTTP client and the metrics."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.pools: dict[Role, WorkerPool] = {"prefill": WorkerPool("prefill", config.prefill_urls),
                                              "decode": WorkerPool("decode", config.decode_urls)}
        self.cache = PrefixCache(config.prefix_cache_blocks)
        self.metrics = RouterMetrics()
        self.slow_checks: dict[str, int] = {}  # worker url -> health checks in a row that timed out
        self.headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        assert self._client is not None, "used inside the app's lifespan only"
        return self._client

    def open_client(self) -> None:
        timeout = httpx.Timeout(self.config.request_timeout, connect=_CONNECT_TIMEOUT)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        self._client = httpx.AsyncClient(timeout=timeout, limits=limits, headers=self.headers)

    async def close_client(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def workers(self) -> list[Worker]:
        return [w for role in ROLES for w in self.pools[role]]

    def fail(self, worker: Worker, error: str) -> None:
        if worker.healthy:
            log.warning("%s worker %s failed: %s", worker.role, worker.url, error)
            self.metrics.worker_failures.labels(worker.role).inc()
        worker.mark_failed(error)

    # -- health --------------------------------------------------------------------------------
    async def check(self, worker: Worker) -> None:
        """/health, then the load gauges from /metrics. A refused or broken connection or a non-200
        /health marks the worker unhealthy at once; a slow answer only after _SLOW_CHECKS rounds in a row
        (a worker busy on its only core is not a dead one). /metrics is load information only."""
        timeout = min(max(self.config.health_interval, 1.0), 5.0)
        try:
            r = await self.client.get(worker.url + "/health", timeout=timeout)
        except httpx.TimeoutException as e:
            slow = self.slow_checks[worker.url] = self.slow_checks.get(worker.url, 0) + 1
            if slow >= _SLOW_CHECKS:
                self.fail(worker, f"/health did not answer in {timeout:g} s, {slow} times in a row: {_describe(e)}")
            return
        except httpx.HTTPError as e:
            return self.fail(worker, _describe(e))
        self.slow_checks.pop(worker.url, None)
        if r.status_code != 200:
            return self.fail(worker, f"/health answered {r.status_code}")
        worker.kv_address = _kv_address(r)
        try:
            m = await self.client.get(worker.url + "/metrics", timeout=timeout)
            if m.status_code == 200:
                _read_gauges(worker, m.text)
        except httpx.HTTPError:
            pass  # the load stays as last seen
        if not worker.healthy:
            log.info("%s worker %s is healthy", worker.role, worker.url)
        worker.healthy, worker.last_error = True, None

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(w) for w in self.workers()))

    async def health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval)
            try:
                await self.check_all()
            except Exception:  # noqa: BLE001 - one bad round must not end the checks for good
                log.exception("a round of health checks failed")

    def update_gauges(self) -> None:
        for role in ROLES:
            healthy = self.pools[role].healthy()
            self.metrics.queue_depth.labels(role).set(sum(w.running + w.waiting for w in healthy))
            self.metrics.healthy_workers.labels(role).set(len(healthy))

    # -- steps ---------------------------------------------------------------------------------
    async def with_retries(self, role: Role, text: str, step: Callable[[Worker], Awaitable[T]],
                           tried: list[str] | None = None) -> T:
        """Run `step` on a worker of the pool; on WorkerFailed, on another, up to max_retries more.
        `tried` (shared by the steps of one stream) holds the workers that failed it."""
        tried = [] if tried is None else tried
        last_error = ""
        for attempt in range(self.config.max_retries + 1):
            workers = self.pools[role].healthy(exclude=tried)
            if not workers:
                break
            worker = choose_prefill(workers, text, self.cache, self.config.balance_threshold) \
                if role == "prefill" else choose_decode(workers)
            if attempt:
                self.metrics.retries.labels(role).inc()
            try:
                return await step(worker)
            except WorkerFailed as e:
                self.fail(worker, str(e))
                tried.append(worker.url)
                last_error = f"; {worker.url} failed: {e}"
        raise OpenAIError(503, f"no healthy {role} worker could take the request{last_error}", "service_unavailable",
                          code="no_healthy_worker")

    async def post(self, worker: Worker, path: str, body: dict[str, Any]) -> httpx.Response:
        """One whole (non-streamed) step; WorkerFailed or Rejected unless the worker answered 2xx."""
        worker.in_flight += 1
        worker.num_requests += 1
        try:
            r = await self.client.post(worker.url + path, json=body)
        except httpx.HTTPError as e:
            raise WorkerFailed(_describe(e)) from None
        finally:
            worker.in_flight -= 1
        _check_status(r)
        return r

    async def prefill(self, worker: Worker, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        r = await self.post(worker, path, body)
        try:
            answer = r.json()
        except ValueError:
            raise WorkerFailed("answered 200 with a body that is not JSON") from None
        params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
        return params if isinstance(params, dict) else None

    def start_overlapped_prefill(self, path: str, body: dict[str, Any], chat: bool
                                 ) -> tuple[dict[str, Any], asyncio.Task[None]] | None:
        """Send the prompt to a prefill worker that names its KV server, under a transfer id chosen here, and
        return the kv_transfer_params for the decode step (sent at once: it pulls while the prompt is
        computed) with the prefill step's task; None if no healthy prefill worker names its KV server.
        The prefill step is not retried elsewhere: if it fails, the decode worker computes the prompt."""
        workers = [w for w in self.pools["prefill"].healthy() if w.kv_address is not None]
        if not workers:
            return None
        worker = choose_prefill(workers, prompt_text(body, chat), self.cache, self.config.balance_threshold)
        assert worker.kv_address is not None
        transfer_id = uuid.uuid4().hex
        pbody = prefill_body(body, chat)
        pbody["kv_transfer_params"]["transfer_id"] = transfer_id
        task = asyncio.create_task(self._overlapped_prefill(worker, path, pbody))
        host, port = worker.kv_address
        return {"transfer_id": transfer_id, "remote_host": host, "remote_port": port}, task

    async def _overlapped_prefill(self, worker: Worker, path: str, body: dict[str, Any]) -> None:
        try:
            await self.prefill(worker, path, body)
        except WorkerFailed as e:
            self.fail(worker, str(e))  # the decode worker's pulls fail too, and it computes the prompt
        except Rejected as e:  # the worker refused the prompt, and its parked pulls with it
            log.info("prefill worker %s refused an overlapped prefill: %s", worker.url, e.message)

    async def open_stream(self, worker: Worker, path: str, body: dict[str, Any]) -> Upstream:
        worker.in_flight += 1
        worker.num_requests += 1
        try:
            r = await self.client.send(self.client.build_request("POST", worker.url + path, json=body), stream=True)
        except httpx.HTTPError as e:
            worker.in_flight -= 1
            raise WorkerFailed(_describe(e)) from None
        upstream = Upstream(worker, r)
        if r.status_code != 200:
            try:
                await r.aread()
            except httpx.HTTPError as e:
                await upstream.close()
                raise WorkerFailed(_describe(e)) from None
            await upstream.close()
            _check_status(r)
            raise WorkerFailed(f"answered {r.status_code}")
        return upstream


def _kv_address(health: httpx.Response) -> tuple[str, int] | None:
    """A prefill worker's KV server, as its /health names it (None: not named, or not a prefill worker)."""
    try:
        kv = health.json().get("kv")
        return (str(kv["host"]), int(kv["port"])) if isinstance(kv, dict) else None
    except (ValueError, AttributeError, KeyError, TypeError):
        return None


def _read_gauges(worker: Worker, text: str) -> None:
    try:
        for family in text_string_to_metric_families(text):
            if not family.samples:
                continue
            value = family.samples[0].value
            if family.name == "quadrant_num_requests_running":
                worker.running = int(value)
            elif family.name == "quadrant_num_requests_waiting":
                worker.waiting = int(value)
            elif family.name == "quadrant_kv_cache_usage_ratio":
                worker.kv_usage = float(value)
    except ValueError:  # not Prometheus text: the load stays as last seen
        log.debug("unreadable /metrics from %s", worker.url)


class StreamRelay:
    """Relays one decode stream to the client; on a break before anything was relayed the step runs
    again on another worker, after it the unfinished choices are resumed (StreamTracker)."""

    def __init__(self, state: RouterState, path: str, body: dict[str, Any], upstream_body: dict[str, Any],
                 chat: bool, upstream: Upstream, tried: list[str], arrival: float,
                 prefill_task: asyncio.Task[None] | None = None) -> None:
        self.state, self.path, self.upstream_body = state, path, upstream_body
        self.prefill_task = prefill_task  # an overlapped prefill step, cancelled if the stream ends first
        self.upstream = upstream
        self.tracker = StreamTracker(body, chat)
        self.tried = tried  # decode workers that failed this request
        self.arrival = arrival
        self.first: float | None = None
        self.last = arrival
        self.num_tokens = 0
        self.status = "200"  # for the requests counter: 200 unless the stream ends in an error event

    def _count(self) -> None:
        if self.tracker.new_tokens:
            self.last = time.perf_counter()
            self.first = self.first or self.last
            self.num_tokens += self.tracker.new_tokens

    async def events(self) -> AsyncIterator[bytes]:
        state, tracker = self.state, self.tracker
        try:
            sent = False
            while True:
                error = "the stream ended before [DONE]"
                try:
                    async for raw, data in sse_events(self.upstream.response):
                        out = tracker.accept(data)
                        self._count()
                        yield raw if out is None else sse(out)
                        sent = True
                        if tracker.done:
                            return
                except httpx.HTTPError as e:
                    error = _describe(e)
                finally:
                    await self.upstream.close()
                state.fail(self.upstream.worker, f"decode stream broke: {error}")
                self.tried.append(self.upstream.worker.url)
                if sent:
                    break
                state.metrics.retries.labels("decode").inc()
                try:  # nothing reached the client yet: the whole step again, elsewhere
                    self.upstream = await state.with_retries(
                        "decode", "", lambda w: state.open_stream(w, self.path, self.upstream_body), self.tried)
                except (OpenAIError, Rejected) as e:
                    self.status = "503"
                    yield error_event(e.message, "service_unavailable")
                    yield DONE
                    return
            if not tracker.resumable():
                self.status = "502"
                yield error_event(f"the decode worker failed mid-stream ({error}) and the stream cannot be "
                                   "resumed: the worker sent no token ids")
                yield DONE
                return
            state.metrics.resumed_streams.inc()
            async for event in self._resume():
                yield event
        finally:
            await self.upstream.close()
            if self.prefill_task is not None:
                self.prefill_task.cancel()
            state.metrics.in_flight.dec()
            state.metrics.requests.labels(self.path, self.status).inc()
            if self.first is not None:
                ttft = self.first - self.arrival
                tpot = (self.last - self.first) / (self.num_tokens - 1) if self.num_tokens > 1 else 0.0
                state.metrics.ttft.observe(ttft)
                if self.num_tokens > 1:
                    state.metrics.tpot.observe(tpot)
                if self.status == "200":
                    state.metrics.streams_finished.inc()
                    if ttft <= state.config.ttft_slo and tpot <= state.config.tpot_slo:
                        state.metrics.slo_attained.inc()

    async def _resume(self) -> AsyncIterator[bytes]:
        state, tracker = self.state, self.tracker
        for index in tracker.unfinished():
            while not tracker.choices[index].finished:
                body = tracker.resume_body(index)
                if body is None:  # it broke after its last token, before its finish chunk
                    yield sse(tracker.finish_chunk(index, "length"))
                    break
                try:
                    self.upstream = await state.with_retries(
                        "decode", "", lambda w: state.open_stream(w, "/v1/completions", body), self.tried)
                except (OpenAIError, Rejected) as e:
                    self.status = "503"
                    yield error_event(f"resuming the broken stream failed: {e.message}", "service_unavailable")
                    yield DONE
                    return
                error = "the resumed stream ended before its choice finished"
                try:
                    async for _, data in sse_events(self.upstream.response):
                        if data.strip() == "[DONE]":
                            break
                        out = tracker.translate(index, data)
                        self._count()
                        if out is not None:
                            yield sse(out)
                except httpx.HTTPError as e:
                    error = _describe(e)
                finally:
                    await self.upstream.close()
                if not tracker.choices[index].finished:
                    state.fail(self.upstream.worker, error)
                    self.tried.append(self.upstream.worker.url)
        if tracker.include_usage and not tracker.usage_sent:
            yield sse(tracker.usage_chunk())
        yield DONE


# -- the app -------------------------------------------------------------------------------------

async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        raise OpenAIError(400, "the request body is not valid JSON", code="invalid_value") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object", code="invalid_value")
    return body


async def _until_disconnect(request: Request, aw: Awaitable[T]) -> T:
    """Await `aw`, cancelling it (and so the worker's request) if the client goes away meanwhile."""
    task = asyncio.ensure_future(aw)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientGone
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def build_router_app(config: RouterConfig) -> FastAPI:
    state = RouterState(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.open_client()
        await state.check_all()  # /health is right from the first request
        checker = asyncio.create_task(state.health_loop())
        try:
            yield
        finally:
            checker.cancel()
            await asyncio.gather(checker, return_exceptions=True)
            await state.close_client()

    app = FastAPI(title="quadrant router", version=__version__, lifespan=lifespan)
    app.state.router = state
    app.add_middleware(GuardMiddleware, api_key=config.api_key, max_body_bytes=config.max_body_bytes,
                       loopback_only=config.host in ("127.0.0.1", "localhost", "::1"))

    install_error_handlers(app, lambda path, status: state.metrics.requests.labels(path, status).inc(), log)

    @app.exception_handler(Rejected)
    async def _rejected(request: Request, exc: Rejected) -> Response:
        state.metrics.requests.labels(request.url.path, str(exc.status)).inc()
        return exc.response()

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone) -> Response:
        state.metrics.requests.labels(request.url.path, "499").inc()
        return Response(status_code=499)

    @app.get("/health")
    async def health() -> Response:
        counts = {role: len(state.pools[role].healthy()) for role in ROLES}
        missing = [role for role in ROLES if not counts[role]]
        if missing:
            return JSONResponse({"status": "unavailable", "missing": missing, "healthy": counts,
                                 "error": " and ".join(f"no healthy {r} worker" for r in missing)}, status_code=503)
        return JSONResponse({"status": "ok", "healthy": counts})

    @app.get("/metrics")
    async def metrics() -> Response:
        state.update_gauges()
        return PlainTextResponse(generate_latest(state.metrics.registry), media_type="text/plain; version=0.0.4")

    @app.get("/workers")
    async def list_workers() -> dict[str, Any]:
        return {"object": "list", "data": [w.as_dict() for w in state.workers()]}

    @app.post("/workers")
    async def add_worker(request: Request) -> dict[str, Any]:
        body = await _json_body(request)
        try:
            role = parse_role(body.get("role"))
            url = normalize_url(body.get("url"))
            # Registering again is a no-op: sidecars re-register periodically (a restarted router relearns them).
            worker = state.pools[role].get(url) or state.pools[role].add(url)
        except ValueError as e:
            raise OpenAIError(400, str(e), param="role" if str(e).startswith("role") else "url") from None
        await state.check(worker)
        log.info("registered %s worker %s (%s)", role, worker.url, "healthy" if worker.healthy else "not healthy yet")
        return worker.as_dict()

    @app.delete("/workers")
    async def remove_worker(request: Request) -> dict[str, Any]:
        body = await _json_body(request)
        try:
            url = normalize_url(body.get("url"))
            roles = [parse_role(body["role"])] if "role" in body else list(ROLES)
        except ValueError as e:
            raise OpenAIError(400, str(e), param="role" if str(e).startswith("role") else "url") from None
        removed = [state.pools[role].remove(url) for role in roles if state.pools[role].get(url) is not None]
        if not removed:
            raise OpenAIError(404, f"{url} is not a registered worker", param="url", code="worker_not_found")
        if any(w.role == "prefill" for w in removed):
            state.cache.forget(url)
        log.info("deregistered %s", ", ".join(f"{w.role} worker {w.url}" for w in removed))
        return {"object": "list", "data": [w.as_dict() for w in removed]}

    @app.get("/v1/models")
    async def models() -> Response:
        async def get(worker: Worker) -> httpx.Response:
            try:
                r = await state.client.get(worker.url + "/v1/models")
            except httpx.HTTPError as e:
                raise WorkerFailed(_describe(e)) from None
            _check_status(r)
            return r

        r = await state.with_retries("decode", "", get)
        return Response(r.content, media_type="application/json")

    async def generate(request: Request, path: str, chat: bool) -> Response:
        arrival = time.perf_counter()
        body = await _json_body(request)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise OpenAIError(400, "stream must be true or false", param="stream", code="invalid_value")
        state.metrics.in_flight.inc()
        relayed = False
        prefill_task: asyncio.Task[None] | None = None
        try:
            kv_params = None
            # The worker takes kv_transfer_params with one prompt only: a batch of prompts skips the
            # prefill step and its decode worker computes the prompts itself.
            if num_prompts(body, chat) == 1:
                overlapped = state.start_overlapped_prefill(path, body, chat) if state.config.overlap_kv else None
                if overlapped is not None:
                    kv_params, prefill_task = overlapped
                else:
                    pbody = prefill_body(body, chat)
                    kv_params = await _until_disconnect(request, state.with_retries(
                        "prefill", prompt_text(body, chat), lambda w: state.prefill(w, path, pbody)))
            dbody = decode_body(body, kv_params, stream)
            if not stream:
                r = await _until_disconnect(request, state.with_retries(
                    "decode", "", lambda w: state.post(w, path, dbody)))
                state.metrics.requests.labels(path, "200").inc()
                return Response(r.content, media_type="application/json")
            tried: list[str] = []
            upstream = await _until_disconnect(request, state.with_retries(
                "decode", "", lambda w: state.open_stream(w, path, dbody), tried))
            relay = StreamRelay(state, path, body, dbody, chat, upstream, tried, arrival, prefill_task)
            relayed = True  # the relay's end lowers the in-flight gauge and counts the request
            return StreamingResponse(relay.events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        finally:
            if not relayed:
                state.metrics.in_flight.dec()
                if prefill_task is not None:
                    prefill_task.cancel()  # (done already, unless the client left first)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, "/v1/completions", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, "/v1/chat/completions", chat=True)

    return app


def run_router(config: RouterConfig) -> int:
    """Serve until SIGINT/SIGTERM; open streams get a few seconds to finish."""
    import uvicorn

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per health check
    app = build_router_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="info",
                                           timeout_graceful_shutdown=10))
    # As in quadrant.serve.app.serve: uvicorn re-raises the signal into the previous handler after
    # draining; a no-op there makes a drained exit 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quadrant router",
                                     description="Route OpenAI requests over prefill and decode workers.")
    add_router_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config = router_config_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_router(config)


if __name__ == "__main__":
    sys.exit(main())
