"""OpenAIError: a failed request as an HTTP status plus an OpenAI error body.

Raised anywhere below a route and turned into the response by the app's exception
handler. The guard answers before FastAPI runs, so it writes its own error bodies.
"""

from __future__ import annotations

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
