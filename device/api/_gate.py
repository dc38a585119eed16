"""The gate every request passes: bearer token, body size limit, and the audit and
counting of every response.

Every response is an egress: it is written to the pod's audit log as ``api.response``
to peer ``local-api`` with the body's size and ``{route, status}``, never content. A
plain response is recorded before its body is sent; a stream is recorded once, when its
last byte is about to be sent (or when the client goes away). Responses given while the
pod is locked cannot be recorded (the store is closed); they carry no pod data.
Refusals (401) are recorded too: they are responses to another process.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio
from starlette.routing import Match, Router

from covey.device.api._errors import error_response
from covey.device.api._metrics import ApiMetrics
from covey.device.api._served import ServedPod

__all__ = ["MAX_BODY_BYTES", "Gate"]

MAX_BODY_BYTES = 1 << 20
_DRAIN_BYTES = 16 * MAX_BODY_BYTES
_log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class Gate:
    """ASGI middleware: bearer token, body size limit, audit and counters for each response."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], *,
                 served: ServedPod, metrics: ApiMetrics, token: str, router: Router) -> None:
        self.app = app
        self.served = served
        self.metrics = metrics
        self.token = token.encode()
        self.router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self._route(scope)
        record = _Sent(route)

        async def tracked(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = int(message["status"])
            elif message["type"] == "http.response.body":
                record.nbytes += len(message.get("body", b""))
                if not message.get("more_body", False):
                    await self._audit(record)
            await send(message)

        try:
            await self._handle(scope, receive, tracked)
        except Exception:
            _log.error("internal error on %s", route, exc_info=True)
            if record.status == 0:
                await error_response(500, "internal error; details are in the pod's log",
                                     "api_error", "internal_error")(scope, receive, tracked)
        finally:
            if record.status and not record.audited:  # the client went away mid-stream
                with anyio.CancelScope(shield=True):
                    await self._audit(record)
            self.metrics.requests.labels(route, str(record.status or 499)).inc()

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        if not self._authorised(headers.get("authorization", "")):
            response = error_response(401, "missing or wrong bearer token (see api.token in "
                                      "the pod home)", "authentication_error", "invalid_api_key")
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        body = await _read_body(receive, headers.get("content-length"))
        if body is None:
            await error_response(413, f"the request body exceeds {MAX_BODY_BYTES} bytes",
                                 code="request_too_large")(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    def _authorised(self, header: str) -> bool:
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                                 self.token)

    def _route(self, scope: Scope) -> str:
        """The route's path template (never the path itself: it may carry user text)."""
        for candidate in self.router.routes:
            match, _ = candidate.matches(scope)
            if match != Match.NONE:
                return str(getattr(candidate, "path", "unmatched"))
        return "unmatched"

    async def _audit(self, record: _Sent) -> None:
        if record.audited:
            return
        record.audited = True
        await anyio.to_thread.run_sync(self.served.audit_response, record.route,
                                       record.status, record.nbytes)


@dataclasses.dataclass
class _Sent:
    route: str
    status: int = 0
    nbytes: int = 0
    audited: bool = False


async def _read_body(receive: Receive, declared: str | None) -> bytes | None:
    """The whole request body, or None when it is larger than :data:`MAX_BODY_BYTES`.

    An oversized body is still read to its end (up to :data:`_DRAIN_BYTES`) and dropped,
    so the client, still sending, gets the 413 rather than a reset connection.
    """
    if declared is not None and declared.strip().isdigit() and int(declared) > _DRAIN_BYTES:
        return None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break  # a disconnect: the app will notice it too
        chunk = message.get("body", b"")
        size += len(chunk)
        if size <= MAX_BODY_BYTES:
            chunks.append(chunk)
        elif size > _DRAIN_BYTES:
            return None
        if not message.get("more_body", False):
            break
    return b"".join(chunks) if size <= MAX_BODY_BYTES else None


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
