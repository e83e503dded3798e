"""/v1/embeddings (OpenAI's shape) and the embedding helper Ollama's /api/embed shares.

Each input is one engine request that only runs its prompt (max_tokens 0) and comes back with
its final hidden states mean-pooled and L2-normalised; several inputs are batched in the engine
like any other requests.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from quadrant.errors import QuadrantError
from quadrant.sampling_params import SamplingParams
from quadrant.serve.admission import ServerState
from quadrant.serve.errors import OpenAIError
from quadrant.serve.model_pool import ModelPool

_MAX_INPUTS = 256


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None


async def embed(state: ServerState, inputs: list[str | list[int]], param: str = "input"
                ) -> tuple[list[list[float]], int]:
    """(one normalised vector per input, prompt tokens in all); OpenAIError 400 on a bad input."""
    llm = state.ready()
    if not inputs or len(inputs) > _MAX_INPUTS:
        raise OpenAIError(400, f"{param} must hold 1 to {_MAX_INPUTS} inputs", param=param)
    if any(len(x) == 0 for x in inputs):
        raise OpenAIError(400, f"{param} must not hold empty inputs", param=param)
    try:
        ids = await llm.call(lambda e: [e.encode(x) for x in inputs])
    except (QuadrantError, ValueError) as e:
        raise OpenAIError(400, str(e), param=param) from None
    longest = max(len(i) for i in ids)
    if longest >= state.max_model_len:
        raise OpenAIError(400, f"an input has {longest} tokens; this model's context holds {state.max_model_len}",
                          param=param, code="context_length_exceeded")
    params = SamplingParams(max_tokens=0, temperature=0.0, pooling="mean")
    state.admit(len(ids))
    try:
        finals = await asyncio.gather(*[_last(llm.generate(i, params)) for i in ids])
    except RuntimeError as e:  # this request failed inside the engine; the others go on
        raise OpenAIError(500, f"embedding failed: {e}", "server_error") from None
    finally:
        state.release(len(ids))
    vectors = []
    for out in finals:
        if out.error is not None or out.embedding is None:
            raise OpenAIError(500, f"embedding failed: {out.error}", "server_error")
        vectors.append(out.embedding)
    return vectors, sum(len(i) for i in ids)


async def _last(stream: Any) -> Any:
    last = None
    try:
        async for out in stream:
            last = out
    finally:
        await stream.aclose()
    return last


def add_embedding_routes(app: FastAPI, pool: ModelPool) -> None:
    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> dict[str, Any]:
        state = await pool.get(body.model)
        inputs: list = [body.input] if isinstance(body.input, str) or (
            body.input and isinstance(body.input[0], int)) else list(body.input)
        vectors, tokens = await embed(state, inputs)
        width = len(vectors[0])
        if body.dimensions is not None and body.dimensions != width:
            raise OpenAIError(400, f"dimensions: this model's embeddings have {width}; shortening is not supported",
                              param="dimensions", code="unsupported_value")
        data = [{"object": "embedding", "index": i,
                 "embedding": v if body.encoding_format == "float"
                 else base64.b64encode(np.asarray(v, dtype=np.float32).tobytes()).decode()}
                for i, v in enumerate(vectors)]
        state.metrics.requests.labels("/v1/embeddings", "200").inc()
        return {"object": "list", "data": data, "model": state.config.model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
