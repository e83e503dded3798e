"""GuardMiddleware: the checks every request passes before any route sees it.

Host (loopback servers refuse other names, against DNS rebinding), API key
(constant-time; PUBLIC_PATHS stay open) and body size (chunked bodies included).
It knows nothing of the engine or the routes; refusals are OpenAI error bodies.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

PUBLIC_PATHS = frozenset({"/health", "/version", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
PUBLIC_PREFIXES = ("/web/",)  # the chat page's static files (it asks the user for the key)


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path == "/" or path.startswith(PUBLIC_PREFIXES)


LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})


def _error(status: int, message: str, type_: str, code: str | None = None) -> dict[str, Any]:
    return {"status": status, "body": {"error": {"message": message, "type": type_, "param": None, "code": code}}}


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
        if self.api_key and not is_public(scope["path"]):
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
