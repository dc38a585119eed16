"""covey's Flower app, signed by the aggregator and handed to its own SuperLink.

A Flower 1.42 SuperNode started with ``--trusted-entities`` runs only apps whose
verification record carries a signature by a trusted key, and a SuperLink gives an app
a verification record in one case only: when it fetches the app by name
(``flwr run @publisher/app==x.y.z``) from the Flower Hub API at
``FLWR_SUPERGRID_API_URL`` (``POST /hub/fetch-fab`` answers a download URL and the
app's signatures; ``flwr/superlink/servicer/control/control_handlers.py``:
``_get_remote_fab``). An app sent as files (``flwr run PATH``) reaches SuperNodes with
no verification at all, and they refuse it.

So covey serves the two requests of that API its SuperLink makes, on the loopback and
only while ``covey train`` submits a run: covey's app, built as ``flwr run`` builds an
app and signed with the aggregator's Ed25519 key (the key pods pin when they join), and
nothing else. Nothing is fetched from the Internet.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import time
import tomllib
from typing import Any

from covey.aggregator._deploy import FLOWER_APP, AggregatorError

__all__ = ["AppHub"]

_BUSY = 30.0  # seconds to wait for the hub's port


class _Handler(http.server.BaseHTTPRequestHandler):
    hub: AppHub

    def do_POST(self) -> None:
        if self.path != "/hub/fetch-fab":
            return self._send(404, b'{"detail": "not found"}')
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        except ValueError:
            return self._send(400, b'{"detail": "bad request"}')
        hub = self.hub
        if body.get("app_id") != hub.app_id or body.get("app_version") not in (None,
                                                                                 hub.version):
            return self._send(404, b'{"detail": "only covey\'s own app is served here"}')
        answer = {"fab_url": f"http://127.0.0.1:{hub.port}/fab/{hub.fab_hash}",
                  "verifications": [hub.verification]}
        return self._send(200, json.dumps(answer).encode())

    def do_GET(self) -> None:
        if self.path != f"/fab/{self.hub.fab_hash}":
            return self._send(404, b'{"detail": "not found"}')
        return self._send(200, self.hub.fab, "application/octet-stream")

    def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class AppHub:
    """covey's signed app, served on ``127.0.0.1:port`` inside a ``with`` block."""

    def __init__(self, registry: Any, port: int) -> None:
        from flwr.cli.build import build_fab_from_disk

        meta = tomllib.loads((FLOWER_APP / "pyproject.toml").read_text())
        self.app_id = f"@{meta['tool']['flwr']['app']['publisher']}/{meta['project']['name']}"
        self.version = str(meta["project"]["version"])
        self.fab = build_fab_from_disk(FLOWER_APP)
        self.fab_hash = hashlib.sha256(self.fab).hexdigest()
        self.verification = registry.sign_app(self.fab)
        self.port = port
        self._server: http.server.ThreadingHTTPServer | None = None

    @property
    def spec(self) -> str:
        """What ``flwr run`` names the app by: ``@publisher/name==version``."""
        return f"{self.app_id}=={self.version}"

    def __enter__(self) -> AppHub:
        """Serve until the block ends.

        Raises:
            AggregatorError: the port stays taken for ``_BUSY`` seconds.
        """
        handler = type("Handler", (_Handler,), {"hub": self})
        deadline = time.monotonic() + _BUSY
        while self._server is None:
            try:
                self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port),
                                                               handler)
            except OSError:
                # Most likely another `covey train` submitting its run: it takes a second.
                if time.monotonic() > deadline:
                    raise AggregatorError(
                        f"port {self.port} on the loopback, where the SuperLink fetches "
                        "covey's signed app, stays taken: restart the aggregator") from None
                time.sleep(0.2)
        threading.Thread(target=self._server.serve_forever, name="covey-app-hub",
                         daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
