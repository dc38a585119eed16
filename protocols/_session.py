"""A sync session over TCP (asyncio): the handshake, then vector / delta / ack.

Both sides send their version vector, answer the other's with a delta, merge the delta
they receive and acknowledge it; the session ends when both deltas are acknowledged.
What a session moved is returned (and reported to ``on_sync``) as sizes and collection
names only, for the audit log.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from covey.protocols._channel import (
    ChannelError,
    FrameReader,
    Handshake,
    Pinning,
    SecureChannel,
)
from covey.protocols._crdt import Delta, Replica
from covey.protocols._hlc import HLC

__all__ = ["HANDSHAKE_TIMEOUT", "SyncServer", "SyncStats", "sync_with"]

HANDSHAKE_TIMEOUT = 10.0


@dataclass
class SyncStats:
    """What one session moved (no content)."""

    peer: str = ""  # the peer's device key, hex
    bytes_in: int = 0
    bytes_out: int = 0
    received: int = 0  # entries received
    changed: int = 0  # entries that changed here
    sent: int = 0
    collections: set[str] = field(default_factory=set)

    def to_dict(self) -> dict[str, Any]:
        return {"peer": self.peer, "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "received": self.received, "changed": self.changed, "sent": self.sent,
                "collections": sorted(self.collections)}


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 stats: SyncStats) -> None:
        self.reader, self.writer, self.stats = reader, writer, stats
        self.frames = FrameReader()
        self.pending: list[bytes] = []

    async def send(self, data: bytes) -> None:
        self.stats.bytes_out += len(data)
        self.writer.write(data)
        await self.writer.drain()

    async def frame(self) -> bytes:
        while not self.pending:
            data = await self.reader.read(65536)
            if not data:
                raise ChannelError("the peer closed the connection")
            self.stats.bytes_in += len(data)
            self.pending.extend(self.frames.feed(data))
        return self.pending.pop(0)


async def _exchange(conn: _Conn, channel: SecureChannel, replica: Replica) -> None:
    stats = conn.stats
    await conn.send(channel.seal({"type": "vector", "vector": {
        n: t.encode() for n, t in replica.vector.items()}}))
    acked = merged = False  # the peer merged our delta; we merged theirs
    while not (acked and merged):
        message = channel.open(await conn.frame())
        kind = message.get("type")
        try:
            if kind == "vector":
                peer = {str(n): HLC.decode(str(t)) for n, t in dict(message["vector"]).items()}
                delta = replica.delta_for(peer)
                stats.sent += len(delta.entries)
                stats.collections.update(e.collection for e in delta.entries)
                await conn.send(channel.seal({"type": "delta", **delta.to_dict()}))
            elif kind == "delta":
                delta = Delta.from_dict(message)
                stats.received += len(delta.entries)
                stats.collections.update(e.collection for e in delta.entries)
                stats.changed += replica.merge(delta)
                merged = True
                await conn.send(channel.seal({"type": "ack"}))
            elif kind == "ack":
                acked = True
            elif kind == "error":
                raise ChannelError(f"the peer refused: {message.get('message', '')}")
            else:
                raise ChannelError(f"unknown message type {kind!r}")
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ChannelError):
                raise
            raise ChannelError(f"malformed {kind} message") from None


async def sync_with(host: str, port: int, replica: Replica, device_key: Ed25519PrivateKey,
                    pinning: Pinning) -> SyncStats:
    """Connect to a pod and sync both ways (raises ChannelError, OSError)."""
    stats = SyncStats()
    reader, writer = await asyncio.open_connection(host, port)
    conn = _Conn(reader, writer, stats)
    try:
        hs = Handshake(device_key, pinning, initiator=True)

        async def handshake() -> SecureChannel:
            await conn.send(hs.hello())
            head, identity = await conn.frame(), await conn.frame()
            last, channel = hs.finish(head, identity)
            await conn.send(last)
            return channel

        channel = await asyncio.wait_for(handshake(), HANDSHAKE_TIMEOUT)
        stats.peer = channel.peer_key.hex()
        await _exchange(conn, channel, replica)
        return stats
    finally:
        writer.close()
        await asyncio.gather(writer.wait_closed(), return_exceptions=True)


class SyncServer:
    """Accepts sync sessions for one replica on a TCP port."""

    def __init__(self, replica: Replica, device_key: Ed25519PrivateKey, pinning: Pinning,
                 on_sync: Callable[[SyncStats], None] | None = None,
                 on_refused: Callable[[str], None] | None = None) -> None:
        self.replica, self.device_key, self.pinning = replica, device_key, pinning
        self.on_sync, self.on_refused = on_sync, on_refused
        self.server: asyncio.Server | None = None
        self.lock = asyncio.Lock()  # one merge at a time

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self.server = await asyncio.start_server(self._serve, host, port)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stats = SyncStats()
        conn = _Conn(reader, writer, stats)
        try:
            hs = Handshake(self.device_key, self.pinning, initiator=False)

            async def handshake() -> SecureChannel:
                await conn.send(hs.reply(await conn.frame()))
                return hs.accept(await conn.frame())

            channel = await asyncio.wait_for(handshake(), HANDSHAKE_TIMEOUT)
            stats.peer = channel.peer_key.hex()
            async with self.lock:
                await _exchange(conn, channel, self.replica)
            if self.on_sync:
                self.on_sync(stats)
        except (TimeoutError, ChannelError, OSError) as exc:
            if self.on_refused:
                self.on_refused(str(exc))
        finally:
            writer.close()
            await asyncio.gather(writer.wait_closed(), return_exceptions=True)
