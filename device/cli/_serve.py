"""`covey serve`: the pod's OpenAI-compatible API on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from covey.device._pod import Pod
from covey.device._stop import running
from covey.device.cli._context import CaptureThread
from covey.device.cli._pod import HomeOpt, JsonOpt, home_for, passphrase
from covey.device.cli._sync import SyncThread
from covey.errors import CoveyError, InvalidInputError, PodNotFoundError

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["DEFAULT_PORT", "serve"]

DEFAULT_PORT = 8377
_log = logging.getLogger(__name__)


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free port).

    Raises:
        ListenError: the address is in use or not on this machine.
    """
    from covey.device.api import ListenError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(host, port, exc.strerror or "unknown host") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ListenError(host, port, exc.strerror or type(exc).__name__) from None
    sock.setblocking(False)
    return sock


def _url(sock: socket.socket, scheme: str = "http") -> str:
    host, port = sock.getsockname()[:2]
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def _check_tls(cert: Path | None, key: Path | None) -> bool:
    """Whether TLS was asked for, with a certificate and key that load.

    Raises:
        InvalidInputError: one without the other, or files that do not load.
    """
    import ssl

    if cert is None and key is None:
        return False
    if cert is None or key is None:
        raise InvalidInputError("--tls-cert and --tls-key go together")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except ssl.SSLError:  # before OSError, of which it is a kind
        raise InvalidInputError(f"cannot use {cert} and {key} for TLS (not a PEM "
                                "certificate and its private key)") from None
    except OSError as exc:
        raise InvalidInputError(f"cannot use {cert} and {key} for TLS "
                                f"({exc.strerror or type(exc).__name__})") from None
    return True


def serve(
    home: HomeOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback only, unless "
                                           "--allow-remote).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free port).")
                    ] = DEFAULT_PORT,
    generator: Annotated[str | None, typer.Option(
        help="onnx (default), torch, or openai (with --url).")] = None,
    url: Annotated[str | None, typer.Option(help="OpenAI-compatible server URL.")] = None,
    allow_remote: Annotated[bool, typer.Option(
        "--allow-remote", help="Allow a non-loopback address (needs --tls-cert and "
                               "--tls-key; logs a warning).")] = False,
    tls_cert: Annotated[Path | None, typer.Option(
        help="PEM certificate: serve HTTPS (required with --allow-remote).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key of --tls-cert.")
                       ] = None,
    sync: Annotated[bool, typer.Option(
        "--sync/--no-sync", help="Sync with your paired devices in the background.")] = True,
    sync_address: Annotated[str, typer.Option(
        help="Where the sync loop listens and announces (0.0.0.0: every interface).")
    ] = "0.0.0.0",  # noqa: S104
    as_json: JsonOpt = False,
) -> None:
    """Serve the pod's OpenAI-compatible API until Ctrl-C.

    Another address than the loopback needs --allow-remote and TLS (--tls-cert,
    --tls-key): the token opens the whole pod, so it never crosses a network in the clear.

    Every request needs `Authorization: Bearer <token>`, the token kept in api.token in
    the pod home (created on first serve, mode 0600); /metrics needs it too. Each
    response is recorded (size and route, never content) in the pod's audit log.
    """
    # Imported here: the server stack costs ~0.25 s, which no other command should pay.
    import uvicorn

    from covey.device.api import TOKEN_FILE, check_bind_host, create_app

    tls = _check_tls(tls_cert, tls_key)
    check_bind_host(host, allow_remote, tls)
    resolved = home_for(home)
    if not Pod.exists(resolved):
        raise PodNotFoundError(resolved)
    secret = passphrase()
    sock = _listen(host, port)
    app: FastAPI | None = None
    syncing: SyncThread | None = None
    capturing: CaptureThread | None = None
    registration = running(resolved, "serve")
    registration.__enter__()
    try:
        app = create_app(resolved, secret, generator, url)
        if sync:
            syncing = SyncThread(resolved, secret, sync_address)
            try:
                syncing.start()
            except (OSError, RuntimeError, CoveyError) as exc:  # serve anyway, say so
                typer.echo(f"covey serve: sync is off: {exc}", err=True)
                syncing = None
        capturing = CaptureThread(resolved, secret)  # idle unless a context source is on
        capturing.start()
        address = _url(sock, "https" if tls else "http")
        if as_json:
            info = {"url": f"{address}/v1", "token_file": str(resolved / TOKEN_FILE),
                    "sync_port": syncing.port if syncing else None}
            sys.stdout.write(json.dumps(info) + "\n")
        else:
            typer.echo(f"covey serve: {address}/v1 (OpenAI-compatible; Ctrl-C stops)")
            typer.echo(f"  token: {resolved / TOKEN_FILE}  (Authorization: Bearer <token>)")
            if syncing:
                typer.echo(f"  sync: port {syncing.port} on {sync_address} (paired devices only)")
        sys.stdout.flush()
        # No uvicorn log config: its records go through covey's redacting handlers. No
        # access log: a query string (?query=...) may be the user's words. No lifespan:
        # the pod is closed below, even after a second Ctrl-C cut the shutdown short.
        config = uvicorn.Config(app, log_config=None, access_log=False, ws="none",
                                lifespan="off", timeout_graceful_shutdown=5,
                                ssl_certfile=tls_cert if tls else None,
                                ssl_keyfile=tls_key if tls else None)
        _log.info("serving the local API on %s", address)
        # uvicorn shuts down gracefully on Ctrl-C, then re-raises it: stopping is success.
        with contextlib.suppress(KeyboardInterrupt):
            uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        registration.__exit__(None, None, None)
        for part in (syncing, capturing):
            if part is not None:
                part.stop()
        if app is not None:
            app.state.served.close()
    if not as_json:
        typer.echo("covey serve: stopped", err=True)
