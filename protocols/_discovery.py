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

__all__ = ["SERVICE", "TXT_VERSION", "Announcer", "Browser", "Peer", "discover",
           "local_addresses"]

SERVICE = "_covey._tcp.local."
TXT_VERSION = "2"


@dataclass(frozen=True)
class Peer:
    """An announcement seen on the network (not yet authenticated)."""

    instance: str
    address: str
    port: int


def local_addresses() -> list[str]:
    """This machine's IPv4 addresses other than the loopback (the loopback if none)."""
    import ifaddr

    found = [str(ip.ip) for adapter in ifaddr.get_adapters() for ip in adapter.ips
             if ip.is_IPv4 and not str(ip.ip).startswith("127.")]
    return found or ["127.0.0.1"]


def _zeroconf(interface: str | None) -> AsyncZeroconf:
    if interface is None:
        return AsyncZeroconf(ip_version=IPVersion.V4Only)
    return AsyncZeroconf(interfaces=[interface], ip_version=IPVersion.V4Only)


class Announcer:
    """Announces this pod's sync port until :meth:`stop`."""

    def __init__(self, port: int, address: str | list[str] = "127.0.0.1",
                 interface: str | None = None) -> None:
        """``address``: where peers reach the sync port (one IPv4 address or several)."""
        self.instance = secrets.token_hex(8)
        addresses = [address] if isinstance(address, str) else list(address)
        self.port, self.address, self.interface = port, addresses[0], interface
        self._zc: AsyncZeroconf | None = None
        self._info = ServiceInfo(
            SERVICE, f"covey-{self.instance}.{SERVICE}",
            addresses=[socket.inet_aton(a) for a in addresses], port=port,
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


class Browser:
    """Keeps the list of covey pods announcing themselves, until :meth:`stop`."""

    def __init__(self, interface: str | None = None, exclude: str = "") -> None:
        self.interface, self.exclude = interface, exclude
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._peers: dict[str, Peer] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._zc = _zeroconf(self.interface)

        def seen(zeroconf: Zeroconf, service_type: str, name: str,
                 state_change: ServiceStateChange) -> None:
            if state_change is ServiceStateChange.Removed:
                self._peers.pop(name, None)
                return
            task = asyncio.ensure_future(self._resolve(name))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        self._browser = AsyncServiceBrowser(self._zc.zeroconf, SERVICE, handlers=[seen])

    async def _resolve(self, name: str) -> None:
        if self._zc is None:
            return
        info = AsyncServiceInfo(SERVICE, name)
        if await info.async_request(self._zc.zeroconf, 1500):
            peer = _peer(info)
            if peer is not None and peer.instance != self.exclude:
                self._peers[name] = peer

    def peers(self) -> list[Peer]:
        """The pods seen so far and not yet gone, by instance id."""
        return sorted(self._peers.values(), key=lambda p: p.instance)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        if self._zc is not None:
            await self._zc.async_close()
            self._zc = None


async def discover(seconds: float = 2.0, interface: str | None = None,
                   exclude: str = "") -> list[Peer]:
    """The covey pods announcing themselves within ``seconds`` (not ``exclude``)."""
    browser = Browser(interface, exclude)
    await browser.start()
    try:
        await asyncio.sleep(seconds)
        return browser.peers()
    finally:
        await browser.stop()
