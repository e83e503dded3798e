"""AsyncLLM: the engine loop on its own thread, streams of outputs for asyncio callers.

The event loop never runs model code: callers send commands (add, abort) to
the engine thread, which applies them between steps and pushes each step's
outputs into per-request asyncio queues. Closing a stream early (a client
disconnect) aborts its request, which frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, Callable

from quadrant.engine.engine import LLMEngine, Prompt
from quadrant.engine.executor import WorkerDiedError
from quadrant.engine.request import RequestOutput
from quadrant.sampling_params import SamplingParams

log = logging.getLogger(__name__)


def _noop() -> None:
    pass


class EngineDeadError(RuntimeError):
    """The engine loop stopped; no request can complete."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncLLM:
    def __init__(self, engine: LLMEngine, on_dead: Callable[[BaseException], None] | None = None) -> None:
        """`on_dead(error)` runs on the engine thread if the engine stops for good (a worker process died)."""
        self.engine = engine
        self.on_dead = on_dead
        self._commands: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._dead: BaseException | None = None
        engine.set_wakeup(lambda: self._commands.put(_noop))  # a transfer thread's news ends an idle wait
        self._thread = threading.Thread(target=self._loop, name="quadrant-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_model(cls, model: str, **engine_kwargs: Any) -> "AsyncLLM":
        return cls(LLMEngine.from_model(model, **engine_kwargs))

    # -- engine thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                block = not self.engine.has_unfinished_requests()
                while True:  # apply every pending command; wait for one only when idle
                    try:
                        # Idle, wake up anyway when housekeeping is due (a KV lease expiring).
                        cmd = self._commands.get(block=block, timeout=self.engine.idle_timeout() if block else None)
                    except queue.Empty:
                        break
                    if cmd is None:
                        return
                    cmd()  # never raises: _call's wrapper hands exceptions to the caller
                    block = False
                self.engine.housekeeping()
                if self.engine.has_unfinished_requests():
                    self._step()
        except BaseException as e:  # a dead worker, or a bug in the loop itself: fail everyone, loudly
            log.exception("engine loop died")
            self._dead = e
            for stream in self._streams.values():
                stream.put(EngineDeadError(f"the engine stopped: {e}"))
            self._streams.clear()
            if self.on_dead is not None:
                self.on_dead(e)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except WorkerDiedError:
            raise  # no later step can run either: the loop ends and fails everyone
        except Exception as e:
            # A failed step fails every request in flight (their KV state is suspect);
            # the loop itself keeps serving new requests.
            log.exception("engine step failed")
            for rid in list(self.engine.groups):
                self.engine.abort_request(rid)
                stream = self._streams.pop(rid, None)
                if stream is not None:
                    stream.put(RuntimeError(f"generation failed: {e}"))
            return
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put(RuntimeError(f"generation failed: {out.error}") if out.error else out)
                if out.finished:
                    del self._streams[out.request_id]

    def _call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run fn on the engine thread between steps; its result or exception comes back as a future."""
        if self._dead is not None or not self._thread.is_alive():
            raise EngineDeadError("the engine loop is not running")
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            if not fut.set_running_or_notify_cancel():
                return  # the caller gave up (a client that left before we got to it)
            try:
                result = fn()
            except BaseException as e:  # noqa: BLE001 - the caller's to handle
                fut.set_exception(e)
            else:
                fut.set_result(result)

        self._commands.put(run)
        return fut

    # -- asyncio side --------------------------------------------------------------------------
    async def generate(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
        kv_transfer: dict[str, Any] | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream a request's outputs; validation errors (bad params, prompt too long) raise here.
        `kv_transfer`: see LLMEngine.add_request (prefill/decode disaggregation)."""
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue())
        # The id is ours before the add runs, so a caller cancelled mid-add can still abort it.
        rid = request_id if request_id is not None else uuid.uuid4().hex

        def add() -> str:
            self.engine.add_request(prompt, params, rid, kv_transfer)
            self._streams[rid] = stream
            return rid

        try:
            await asyncio.wrap_future(self._call(add))
        except asyncio.CancelledError:
            self.abort(rid)
            raise
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        """Cancel a request (no-op if it already finished); its blocks are freed before the next step."""
        if self._dead is not None:
            return

        def drop() -> None:
            self._streams.pop(request_id, None)
            self.engine.abort_request(request_id)

        self._call(drop)

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run fn(engine) on the engine thread (for stats, tokenising, chat templates) and await it."""
        return await asyncio.wrap_future(self._call(lambda: fn(self.engine)))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop, then the engine's worker processes."""
        if self._thread.is_alive():
            self._commands.put(None)
            self._thread.join(timeout)
        self.engine.shutdown()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self._dead is None
