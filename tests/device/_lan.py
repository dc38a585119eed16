"""An address of this machine that is not the loopback, for tests that need one."""

from __future__ import annotations

import contextlib
import ipaddress
import socket

import pytest


def _usable(address: str) -> bool:
    try:
        if ipaddress.ip_address(address).is_loopback:
            return False
        with socket.socket() as s:
            s.bind((address, 0))
    except (ValueError, OSError):
        return False
    return True


def lan_address() -> str:
    """An IPv4 address of this machine's own (bindable, not 127.0.0.0/8); skips the test
    on a machine with no network interface but the loopback."""
    candidates = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, \
            contextlib.suppress(OSError):
        s.connect(("192.0.2.1", 9))  # UDP connect only picks a route; nothing is sent
        candidates.append(s.getsockname()[0])
    with contextlib.suppress(OSError):
        candidates.extend(socket.gethostbyname_ex(socket.gethostname())[2])
    for address in candidates:
        if _usable(address):
            return str(address)
    pytest.skip("this machine has no address but the loopback")
