"""ServerState: the engine behind the routes, and who may use it now.

It loads the engine (on a thread, so the server answers /health meanwhile),
admits requests up to running + queued capacity (429 beyond), checks the model
name, and turns a dead engine into 503s and a stop. It formats no responses.
"""

from __future__ import annotations

import logging
from typing import Any

from quadrant.engine.async_engine import AsyncLLM
from quadrant.engine.engine import LLMEngine
from quadrant.errors import QuadrantError
from quadrant.serve.config import ServerConfig
from quadrant.serve.errors import OpenAIError
from quadrant.serve.metrics import ServerMetrics

log = logging.getLogger("quadrant.serve")


def _engine_bytes(engine: LLMEngine) -> int:
    try:
        model, caches = engine.model, engine.runner.kv_caches
    except QuadrantError:  # the model lives in worker processes
        return 0
    tensors = [*model.parameters(), *model.buffers()]
    cache_bytes = sum(t.numel() * t.element_size() for kv in caches for t in vars(kv).values()
                      if hasattr(t, "element_size"))
    return sum(t.numel() * t.element_size() for t in tensors) + cache_bytes


class ServerState:
    """What the routes share: the engine once loaded, admission counts, metrics."""

    def __init__(self, config: ServerConfig, metrics: ServerMetrics | None = None) -> None:
        self.config = config
        self.llm: AsyncLLM | None = None
        self.load_error: BaseException | None = None
        self.metrics = metrics or ServerMetrics()  # one registry per server, shared by its models
        self.max_model_len = 0
        self.max_inflight = 0
        self.active = 0  # admitted requests not yet finished (the event loop is its only writer)
        self.engine_error: BaseException | None = None  # set when the engine died after loading
        self.memory_bytes = 0  # weights and KV cache of a one-process engine (0 where workers hold them)
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
            self.memory_bytes = _engine_bytes(engine)
            self.max_inflight = engine.config.scheduler.max_num_seqs + self.config.max_queued_requests
            self.llm = AsyncLLM(engine, on_dead=self.engine_died)
            log.info("model %s loaded in %.1fs", self.config.model, engine.load_seconds)
        except BaseException as e:  # reported by /health and the CLI; the process then exits
            log.error("loading %s failed: %s", self.config.model, e)
            self.load_error = e
            if self.on_fatal is not None:
                self.on_fatal()
