"""Per HTTP request: an id (the client's X-Request-Id or a new one, echoed back and put on every log line),
the API key check, one access-log line and the request counter. Plain ASGI, so streams pass untouched."""

from __future__ import annotations

import contextvars
import hmac
import logging
import re
import time
import uuid
from typing import Any, Optional, Union

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.server.errors import ApiError
from engine.server.metrics import Metrics
from engine.server.streaming import to_json

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
access_logger = logging.getLogger("engine.server.access")

_CLIENT_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_OPEN_PATHS = ("/health",)  # a supervisor or load balancer checks these without the key


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every log record (the current HTTP request's, or "-")."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class RequestContext:
    def __init__(self, app: ASGIApp, api_key: Optional[str], metrics: Metrics, known_paths: set[str]) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.metrics = metrics
        self.known_paths = known_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        client_id = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = client_id if _CLIENT_ID.match(client_id) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = list(message.get("headers", [])) + [(b"x-request-id", request_id.encode())]
            await send(message)

        try:
            if self._authorized(scope["path"], headers.get(b"authorization")):
                await self.app(scope, receive, send_with_id)
            else:
                message = "missing or wrong API key (send 'Authorization: Bearer <key>')"
                await _send_error(send_with_id, ApiError(401, message, code="invalid_api_key"))
        finally:
            path = scope["path"] if scope["path"] in self.known_paths else "other"
            self.metrics.count_http(path, status)
            access_logger.info("%s %s %d %.3fs", scope["method"], scope["path"], status, time.perf_counter() - started)
            request_id_var.reset(token)

    def _authorized(self, path: str, header: Optional[bytes]) -> bool:
        if self.api_key is None or path in _OPEN_PATHS:
            return True
        scheme, _, key = (header or b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(key.strip(), self.api_key)


def request_rid(request: Any) -> str:
    """The HTTP request's id, used as its engine request id so one id follows it through every log line."""
    return getattr(request.state, "request_id", None) or uuid.uuid4().hex


def engine_rids(request: Any, prompt: Any) -> Union[str, list[str], None]:
    """Engine request ids for a prompt (the request's id) or a list of them ("<id>-<i>"); None for neither."""
    base = request_rid(request)
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        return base
    if isinstance(prompt, list) and prompt:
        return [f"{base}-{i}" for i in range(len(prompt))]
    return None


async def _send_error(send: Send, error: ApiError) -> None:
    body = to_json(error.body())
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if error.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
