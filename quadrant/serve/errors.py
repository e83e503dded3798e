"""OpenAIError: a failed request as an HTTP status plus an OpenAI error body.

Raised anywhere below a route and turned into the response by the app's exception
handler. The guard answers before FastAPI runs, so it writes its own error bodies.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from quadrant.serve import protocol as P


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = P.ErrorResponse(error=P.ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code))
        return JSONResponse(body.model_dump(), status_code=self.status, headers=self.headers)


ErrorHandler = Callable[[Request, OpenAIError], Awaitable[JSONResponse]]


def install_error_handlers(app: FastAPI, count: Callable[[str, str], None], log: logging.Logger) -> ErrorHandler:
    """OpenAIError -> its JSON body, and any other exception -> a 500 OpenAI body (logged, never a
    traceback to the client); `count(path, status)` counts each. Returns the OpenAIError handler, for
    handlers of other exceptions that answer as OpenAI errors."""

    async def openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        count(request.url.path, str(exc.status))
        return exc.response()

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return await openai_error(request, OpenAIError(500, f"internal error: {type(exc).__name__}", "server_error"))

    app.add_exception_handler(OpenAIError, openai_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, internal_error)
    return openai_error
