"""Engine output streams to HTTP: SSE events as OpenAI streams them, and whole-response collection.

`data: {json}` per chunk, then `data: [DONE]`. The pumps run apart from the response
so a slow or gone client never stalls the engine; closing a stream aborts its request.
Chunk contents come from openai_format.Formatter; admission is the caller's job.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import Request

from quadrant.engine.request import RequestOutput
from quadrant.serve.metrics import ServerMetrics
from quadrant.serve.openai_format import Formatter


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def sse_done() -> str:
    return "data: [DONE]\n\n"


class Disconnected(Exception):
    pass


async def collect(stream: AsyncGenerator[RequestOutput, None], request: Request) -> RequestOutput:
    last = None
    try:
        async for out in stream:
            last = out
            if await request.is_disconnected():
                raise Disconnected
    finally:
        await stream.aclose()  # aborts the request if it did not finish
    assert last is not None
    return last


async def pump(i: int, stream: AsyncGenerator[RequestOutput, None], queue: asyncio.Queue) -> None:
    try:
        async for out in stream:
            await queue.put((i, out))
    except Exception as e:  # noqa: BLE001 - reported to the client in the stream
        await queue.put((i, e))
    finally:
        await stream.aclose()  # aborts the request if it did not finish
        await queue.put((i, None))


async def cancel(tasks: list[asyncio.Task]) -> None:
    for t in tasks:
        t.cancel()


async def sse_events(metrics: ServerMetrics, endpoint: str, queue: asyncio.Queue, num_streams: int,
                     prompt_ids: list[list[int]], formatter: Formatter, include_usage: bool) -> AsyncIterator[str]:
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
                    for chunk in formatter.chunks(index, c, item):
                        yield sse(chunk)
                if newly_finished:
                    finished.add(index)
            if item.finished:
                completion_tokens += sum(len(c.token_ids) for c in item.outputs)
                metrics.observe_output(item)
        if include_usage:
            yield sse(formatter.usage_chunk(sum(len(p) for p in prompt_ids), completion_tokens))
        yield sse_done()
    finally:
        metrics.requests.labels(endpoint, status).inc()
