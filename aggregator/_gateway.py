"""The Fleet gateway: the one part of the SuperLink that pods reach over the network.

Flower 1.42 serves the Fleet API (SuperNodes), the Control API (``flwr run``: an app
submitted there runs on the aggregator, and on every pod that accepts it) and the
ServerApp's runtime API on one HTTPS port (``--host``/``--port``;
``flwr/superlink/main.py``: ``create_app`` mounts all three routers), and outside
Flower's enterprise edition the Control API has no authentication
(``flwr/superlink/config_loader.py``: the no-op plugin unless OIDC, which the open
source edition lacks). So covey's SuperLink always listens on the loopback. When
``covey aggregator start --host`` names another address, this gateway listens there
instead and relays to the SuperLink exactly the Fleet API's routes
(``POST /v1/fleet/<route>``, the routes of ``flwr/superlink/routers/fleet/router.py``)
and ``GET /health``. Any other request is answered 404 here and never reaches the
SuperLink. Both legs use TLS with the aggregator's certificate; the SuperNode's own
authentication (signed headers) passes through untouched.
"""

from __future__ import annotations

import ssl
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

__all__ = ["FLEET_ROUTES", "allowed"]

FLEET_ROUTES = frozenset({
    "register-node", "activate-node", "deactivate-node", "unregister-node",
    "send-node-heartbeat", "pull-messages", "push-messages", "get-run", "get-fab",
    "push-object", "pull-object", "confirm-message-received"})
_FLEET = "/v1/fleet/"
_MAX_BODY = 512 * 2**20  # Flower's own message limit
# Per connection, or describing the body as it was on the other leg: never relayed.
_HOP = frozenset({"host", "connection", "keep-alive", "transfer-encoding", "te", "upgrade",
                  "content-length", "content-encoding", "proxy-authorization",
                  "proxy-connection", "trailer"})

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def allowed(method: str, path: str) -> str | None:
    """The upstream path for a request the gateway relays, else None."""
    if method == "GET" and path == "/health":
        return path
    if method == "POST" and path.startswith(_FLEET) and path[len(_FLEET):] in FLEET_ROUTES:
        return _FLEET + path[len(_FLEET):]
    return None


class Gateway:
    """An ASGI app relaying the allowed requests to the SuperLink at ``upstream``."""

    def __init__(self, upstream: str, root_cert: Path) -> None:
        self.upstream = upstream
        self.trust = ssl.create_default_context(cafile=str(root_cert))
        self._client: Any = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        if scope["type"] != "http":
            return None
        path = allowed(scope["method"], scope["path"])
        if path is None:
            return await self._answer(send, 404, b"not found")
        body = bytearray()
        while True:
            event = await receive()
            body += event.get("body", b"")
            if len(body) > _MAX_BODY:
                return await self._answer(send, 413, b"request too large")
            if not event.get("more_body", False):
                break
        headers = [(k.decode("latin-1"), v.decode("latin-1"))
                   for k, v in scope["headers"] if k.decode("latin-1").lower() not in _HOP]
        import httpx

        try:
            reply = await self._client.request(scope["method"], self.upstream + path,
                                               headers=headers, content=bytes(body))
        except httpx.HTTPError:
            return await self._answer(send, 502, b"the SuperLink did not answer")
        await send({"type": "http.response.start", "status": reply.status_code,
                    "headers": [(k.encode("latin-1"), v.encode("latin-1"))
                                for k, v in reply.headers.items() if k.lower() not in _HOP]})
        await send({"type": "http.response.body", "body": reply.content})
        return None

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        import httpx

        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                self._client = httpx.AsyncClient(verify=self.trust, timeout=600.0)
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                await self._client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    @staticmethod
    async def _answer(send: Send, status: int, text: bytes) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain"),
                                (b"content-length", str(len(text)).encode())]})
        await send({"type": "http.response.body", "body": text})


def main() -> None:
    """``python -m covey.aggregator._gateway HOST PORT UPSTREAM CERTS_DIR``."""
    import uvicorn

    host, port, upstream, certs = sys.argv[1], int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    uvicorn.run(Gateway(f"https://{upstream}", certs / "ca.crt"), host=host, port=port,
                ssl_certfile=str(certs / "server.pem"), ssl_keyfile=str(certs / "server.key"),
                log_level="warning", lifespan="on")


if __name__ == "__main__":
    main()
