"""Finding a user's other pods on the local network: DNS-SD over mDNS (python-zeroconf,
its asyncio API).

A pod announces ``_covey._tcp.local.`` with a service and host name made of a random
instance id, fresh every run, and TXT records holding only the protocol version and that
instance id: nothing on the network names the user, the device or a key. Who is behind
an announcement is learnt only inside the authenticated channel, and only by a paired
device.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
from dataclasses import dataclass

from zeroconf import IPVersion, ServiceInfo, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

__all__ = ["SERVICE", "TXT_VERSION", "Announcer", "Peer", "discover"]

SERVICE = "_covey._tcp.local."
TXT_VERSION = "1"


@dataclass(frozen=True)
class Peer:
    """An announcement seen on the network (not yet authenticated)."""

    instance: str
    address: str
    port: int


def _zeroconf(interface: str | None) -> AsyncZeroconf:
    if interface is None:
        return AsyncZeroconf(ip_version=IPVersion.V4Only)
    return AsyncZeroconf(interfaces=[interface], ip_version=IPVersion.V4Only)


class Announcer:
    """Announces this pod's sync port until :meth:`stop`."""

    def __init__(self, port: int, address: str = "127.0.0.1",
                 interface: str | None = None) -> None:
        self.instance = secrets.token_hex(8)
        self.port, self.address, self.interface = port, address, interface
        self._zc: AsyncZeroconf | None = None
        self._info = ServiceInfo(
            SERVICE, f"covey-{self.instance}.{SERVICE}",
            addresses=[socket.inet_aton(address)], port=port,
            properties={"v": TXT_VERSION, "id": self.instance},
            server=f"covey-{self.instance}.local.")

    async def start(self) -> None:
        self._zc = _zeroconf(self.interface)
        await self._zc.async_register_service(self._info)

    async def stop(self) -> None:
        if self._zc is not None:
            await self._zc.async_unregister_service(self._info)
            await self._zc.async_close()
            self._zc = None


def _peer(info: AsyncServiceInfo) -> Peer | None:
    """The announcement as a peer, or None when it is not a well-formed covey one."""
    props = info.properties or {}
    if set(props) != {b"v", b"id"} or props[b"v"] != TXT_VERSION.encode():
        return None
    addresses = info.parsed_addresses(IPVersion.V4Only)
    instance = (props[b"id"] or b"").decode("ascii", "replace")
    if not addresses or not info.port or len(instance) != 16:
        return None
    return Peer(instance, addresses[0], int(info.port))


async def discover(seconds: float = 2.0, interface: str | None = None,
                   exclude: str = "") -> list[Peer]:
    """The covey pods announcing themselves within ``seconds`` (not ``exclude``)."""
    zc = _zeroconf(interface)
    names: list[str] = []

    def seen(zeroconf: Zeroconf, service_type: str, name: str,
             state_change: ServiceStateChange) -> None:
        if state_change is not ServiceStateChange.Removed and name not in names:
            names.append(name)

    browser = AsyncServiceBrowser(zc.zeroconf, SERVICE, handlers=[seen])
    try:
        await asyncio.sleep(seconds)
        peers = []
        for name in names:
            info = AsyncServiceInfo(SERVICE, name)
            if await info.async_request(zc.zeroconf, 1500):
                peer = _peer(info)
                if peer is not None and peer.instance != exclude:
                    peers.append(peer)
        return sorted(peers, key=lambda p: p.instance)
    finally:
        await browser.async_cancel()
        await zc.async_close()
