"""Who may reach the API: the bearer token file, and the addresses it may listen on.

The token opens the whole pod, so it lives in ``<pod home>/api.token`` (mode 0600), and
the API listens beyond the loopback only when asked to and only over TLS.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
from pathlib import Path

from covey._files import fsync_dir
from covey.errors import CoveyError

__all__ = ["TOKEN_FILE", "ListenError", "PlainRemoteError", "RemoteBindError",
           "check_bind_host", "ensure_token"]

TOKEN_FILE = "api.token"  # noqa: S105 - a file name, not a secret
_log = logging.getLogger(__name__)


class RemoteBindError(CoveyError):
    """`covey serve` was asked to listen beyond this machine without --allow-remote."""

    exit_code = 2

    def __init__(self, host: str) -> None:
        super().__init__(f"refusing to serve on {host}: not a loopback address "
                         "(the API is for this machine; --allow-remote overrides)")


class PlainRemoteError(CoveyError):
    """`covey serve --allow-remote` on a non-loopback address without TLS."""

    exit_code = 2

    def __init__(self, host: str) -> None:
        super().__init__(f"refusing to serve on {host} over plain HTTP: the token and the "
                         "pod's data would cross the network in the clear (pass --tls-cert "
                         "and --tls-key)")


class ListenError(CoveyError):
    """The API's address cannot be bound (in use, or not on this machine)."""

    exit_code = 2

    def __init__(self, host: str, port: int, reason: str) -> None:
        super().__init__(f"cannot listen on {host}:{port} ({reason})")


def ensure_token(home: Path) -> str:
    """The API token in ``home/api.token``, created (mode 0600) on first use."""
    path = home / TOKEN_FILE
    token = _read_token(path)
    if token is not None:
        return token
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{TOKEN_FILE}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (token + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        if path.exists():  # a damaged token is replaced
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if another `covey serve` created one meanwhile
    except FileExistsError:
        return ensure_token(home)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(home)
    return token


def _read_token(path: Path) -> str | None:
    try:
        mode = path.stat().st_mode
        token = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, OSError):
        _log.warning("the API token file %s is unreadable; making a new token", path)
        return None
    if mode & 0o077:
        _log.warning("the API token file %s was readable by others; now owner-only", path)
        path.chmod(0o600)
    if len(token) < 32 or not token.isascii():
        _log.warning("the API token file %s is damaged; making a new token", path)
        return None
    return token


def check_bind_host(host: str, allow_remote: bool, tls: bool = False) -> None:
    """Refuse a non-loopback ``host`` unless ``allow_remote`` and ``tls``; a remote
    address logs a warning.

    Raises:
        RemoteBindError: ``host`` is not a loopback address and remote use is not allowed.
        PlainRemoteError: remote use is allowed but would be plain HTTP: the bearer token
            opens the whole pod, so it never crosses a network unencrypted.
    """
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return
    if not allow_remote:
        raise RemoteBindError(host)
    if not tls:
        raise PlainRemoteError(host)
    _log.warning("serving the pod's API on %s: any machine that can reach it and holds "
                 "the token can read the pod's memories", host)
