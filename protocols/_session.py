"""Sessions over TCP (asyncio): syncing (vector / delta / ack) and pairing.

A sync session: both sides send their version vector, answer the other's with a delta
(in chunks of at most ``MAX_ENTRIES`` entries), merge the delta they receive and
acknowledge it; the session ends when both deltas are acknowledged. What a session moved
is returned (and reported to ``on_sync``) as sizes and collection names only, for the
audit log.

A pairing session (``purpose: pair``) accepts any device key for the handshake, then
runs commit / reveal / confirm so that both people see the same six digits, and only
after both confirmed does the sponsoring side hand over the user key and certify the
other. The two then sync as usual over the same channel.

The replicated state is reached through a :class:`SyncState`: ``begin`` hands out the
replica with the pod's latest local edits published into it, ``merged`` persists what a
delta changed. :class:`MemoryState` is the in-memory one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from covey.protocols._channel import (
    ChannelError,
    FrameReader,
    Handshake,
    Pinning,
    SecureChannel,
)
from covey.protocols._crdt import Delta, Entry, MergeResult, Replica
from covey.protocols._hlc import HLC
from covey.protocols._identity import commitment, device_id_of, short_auth_string

__all__ = ["HANDSHAKE_TIMEOUT", "MAX_ENTRIES", "MemoryState", "PairResult", "Pairing",
           "RefusedError", "SyncServer", "SyncState", "SyncStats", "pair_with", "sync_with"]

HANDSHAKE_TIMEOUT = 10.0
SESSION_TIMEOUT = 30.0  # the most a sync session may take once authenticated
MAX_ENTRIES = 10_000  # entries in one delta message; larger deltas are split


class RefusedError(ChannelError):
    """The peer refused us; ``code`` is one of the protocol's error codes."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"the peer refused: {message}")
        self.code, self.reason = code, message


def refusal_code(reason: str) -> str:
    """The protocol error code for a pinning refusal reason."""
    return "revoked" if "revoked" in reason else "not_paired"


class SyncState(Protocol):
    """Where a session reads and writes the replicated state."""

    def begin(self) -> Replica:
        """The replica to sync, with local edits published into it."""

    def merged(self, replica: Replica, result: MergeResult, peer: str) -> None:
        """Persist a merged delta from device ``peer`` (``result.changed``: the entries
        that changed here)."""

    def held_key(self) -> str:
        """The public half (base64) of the user key this pod holds, or ""."""

    def key_for(self, peer: str, holds: str) -> bytes | None:
        """The current user key's private bytes if device ``peer`` (which holds the key
        ``holds``) should get them: it is a current device and lacks them. Else None."""

    def receive_key(self, private: bytes, peer: str) -> bool:
        """Hold ``private``, sent by device ``peer``, as the user key if it is the current
        one and replaces a key of the same user; whether it did."""


class MemoryState:
    """A replica held in memory only (it holds no user key)."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica

    def begin(self) -> Replica:
        return self.replica

    def merged(self, replica: Replica, result: MergeResult, peer: str) -> None:
        pass

    def held_key(self) -> str:
        return ""

    def key_for(self, peer: str, holds: str) -> bytes | None:
        return None

    def receive_key(self, private: bytes, peer: str) -> bool:
        return False


def _state(state: SyncState | Replica) -> SyncState:
    return MemoryState(state) if isinstance(state, Replica) else state


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
    refused: Counter[str] = field(default_factory=Counter)  # received entries refused, by why
    sent_user_key: bool = False  # the current user key went to the peer (it lacked it)
    received_user_key: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"peer": self.peer, "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "received": self.received, "changed": self.changed, "sent": self.sent,
                "collections": sorted(self.collections), "refused": dict(self.refused),
                "sent_user_key": self.sent_user_key,
                "received_user_key": self.received_user_key}


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

    async def message(self, channel: SecureChannel) -> dict[str, Any]:
        """The next message; an ``error`` from the peer is raised as RefusedError."""
        message = channel.open(await self.frame())
        while message is None:  # a long message continues in the next frames
            message = channel.open(await self.frame())
        if message.get("type") == "error":
            raise RefusedError(str(message.get("code", "")), str(message.get("message", "")))
        return message

    async def close(self) -> None:
        self.writer.close()
        await asyncio.gather(self.writer.wait_closed(), return_exceptions=True)


async def _tell(conn: _Conn, channel: SecureChannel, code: str, message: str) -> None:
    """Send an error message before closing (best effort: the peer may be gone)."""
    with contextlib.suppress(OSError, ChannelError):
        await conn.send(channel.seal({"type": "error", "code": code, "message": message}))


async def _exchange(conn: _Conn, channel: SecureChannel, state: SyncState) -> None:
    stats = conn.stats
    sender = device_id_of(channel.peer_key)
    replica = state.begin()
    await conn.send(channel.seal({"type": "vector", "holds": state.held_key(), "vector": {
        n: t.encode() for n, t in replica.vector.items()}}))
    acked = merged = False  # the peer merged our delta; we merged theirs
    incoming: list[Entry] = []
    peer_holds = ""
    while not (acked and merged):
        message = await conn.message(channel)
        kind = message.get("type")
        try:
            if kind == "vector":
                peer_holds = str(message.get("holds", ""))
                peer = {str(n): HLC.decode(str(t)) for n, t in dict(message["vector"]).items()}
                delta = replica.delta_for(peer)
                stats.sent += len(delta.entries)
                stats.collections.update(e.collection for e in delta.entries)
                chunks = [delta.entries[i:i + MAX_ENTRIES]
                          for i in range(0, len(delta.entries), MAX_ENTRIES)] or [()]
                for i, chunk in enumerate(chunks):
                    last = i == len(chunks) - 1
                    body = Delta(chunk, delta.vector if last else {}).to_dict()
                    await conn.send(channel.seal({"type": "delta", **body, "more": not last}))
            elif kind == "delta":
                part = Delta.from_dict(message)
                if len(part.entries) > MAX_ENTRIES:
                    raise ChannelError(f"a delta of more than {MAX_ENTRIES} entries")
                incoming.extend(part.entries)
                if message.get("more"):
                    continue
                delta = Delta(tuple(incoming), part.vector)
                stats.received += len(delta.entries)
                stats.collections.update(e.collection for e in delta.entries)
                # Every entry is checked against the device the channel authenticated:
                # it must come from that device, or be signed by the device it names.
                result = replica.merge(delta, peer=sender)
                state.merged(replica, result, sender)
                stats.changed += len(result.changed)
                stats.refused.update(result.refused)
                merged = True
                ack: dict[str, Any] = {"type": "ack", "vector": {
                    n: t.encode() for n, t in replica.vector.items()}}
                # The peer merged our delta before it reads this: it knows the key chain
                # we know, so it can check a rotated user key against it.
                key = state.key_for(sender, peer_holds)
                if key is not None:
                    ack["user_key"] = key.hex()
                    stats.sent_user_key = True
                await conn.send(channel.seal(ack))
            elif kind == "ack":
                acked = True
                if "user_key" in message:
                    if state.receive_key(bytes.fromhex(str(message["user_key"])), sender):
                        stats.received_user_key = True
                    else:  # not the head of the chain as we know it: not held
                        stats.refused["user_key"] += 1
            else:
                raise ChannelError(f"unknown message type {kind!r}")
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ChannelError):
                raise
            code = "clock" if type(exc).__name__ == "ClockDriftError" else "malformed"
            await _tell(conn, channel, code, str(exc) if code == "clock" else
                        f"malformed {kind} message")
            raise ChannelError(f"malformed {kind} message ({exc})") from None


async def _connect(host: str, port: int, device_key: Ed25519PrivateKey, pinning: Pinning,
                   purpose: str, stats: SyncStats) -> tuple[_Conn, SecureChannel]:
    reader, writer = await asyncio.open_connection(host, port)
    conn = _Conn(reader, writer, stats)
    try:
        hs = Handshake(device_key, pinning, initiator=True, purpose=purpose,
                       explain_refusal=True)

        async def handshake() -> SecureChannel:
            await conn.send(hs.hello())
            last, channel = hs.finish(await conn.frame())
            await conn.send(last)
            return channel

        channel = await asyncio.wait_for(handshake(), HANDSHAKE_TIMEOUT)
        stats.peer = channel.peer_key.hex()
        if hs.refusal is not None:
            await _tell(conn, channel, refusal_code(hs.refusal), hs.refusal)
            raise ChannelError(f"refused: {hs.refusal}")
        return conn, channel
    except BaseException:
        await conn.close()
        raise


async def sync_with(host: str, port: int, state: SyncState | Replica,
                    device_key: Ed25519PrivateKey, pinning: Pinning,
                    stats: SyncStats | None = None) -> SyncStats:
    """Connect to a pod and sync both ways.

    Raises:
        RefusedError: the peer refused us (not paired, revoked) and said why.
        ChannelError: the peer failed authentication, was refused, or broke the protocol.
        OSError, TimeoutError: the peer cannot be reached or went silent.
    """
    stats = stats or SyncStats()
    conn, channel = await _connect(host, port, device_key, pinning, "sync", stats)
    try:
        await asyncio.wait_for(_exchange(conn, channel, _state(state)), SESSION_TIMEOUT)
        return stats
    finally:
        await conn.close()


# -- pairing -------------------------------------------------------------------------


@dataclass
class Pairing:
    """One side's part in pairing.

    ``info`` is what this side tells the other: ``name`` (the device's name),
    ``has_user`` (it holds a user key), ``devices`` (how many devices that user has) and
    ``since`` (when the user key was made, ISO 8601, or ""). The side whose user has the
    most devices sponsors (ties: the older user key, then the responder); a side
    without a user key never sponsors unless neither has one.
    ``confirm(sas, peer_info)`` asks the person whether both screens show ``sas``.
    ``sponsor(peer_key, peer_info)`` certifies the peer and returns the user id and the
    user key's private bytes; ``join(user_key, user_id)`` adopts them.
    """

    info: dict[str, Any]
    state: SyncState
    confirm: Callable[[str, dict[str, Any]], Awaitable[bool]]
    sponsor: Callable[[bytes, dict[str, Any]], tuple[str, bytes]]
    join: Callable[[bytes, str], None]


@dataclass
class PairResult:
    """What pairing did: the digits shown, the peer, and this side's role."""

    sas: str
    peer_key: bytes
    peer_info: dict[str, Any]
    role: str  # "sponsor" or "joined"
    stats: SyncStats


def _sponsor_is_responder(responder: dict[str, Any], initiator: dict[str, Any]) -> bool:
    def rank(info: dict[str, Any]) -> tuple[bool, int]:
        return bool(info.get("has_user")), int(info.get("devices", 0))

    if rank(responder) != rank(initiator):
        return rank(responder) > rank(initiator)
    since_r, since_i = str(responder.get("since", "")), str(initiator.get("since", ""))
    if since_r and since_i and since_r != since_i:
        return since_r < since_i
    return True


_PEER_INFO = {"name": str, "has_user": bool, "devices": int, "since": str}


def _peer_info(message: dict[str, Any]) -> dict[str, Any]:
    info = message.get("info")
    if not isinstance(info, dict) or any(not isinstance(info.get(k), t)
                                         for k, t in _PEER_INFO.items()):
        raise ChannelError("malformed pair_commit message")
    return {k: info[k] for k in _PEER_INFO}


async def _pair(conn: _Conn, channel: SecureChannel, device_key: Ed25519PrivateKey,
                pairing: Pairing, initiator: bool) -> PairResult:
    mine = device_key.public_key().public_bytes_raw()
    nonce = os.urandom(16)
    await conn.send(channel.seal({"type": "pair_commit", "commit": commitment(mine, nonce).hex(),
                                  "info": pairing.info}))
    message = await conn.message(channel)
    if message.get("type") != "pair_commit":
        raise ChannelError("expected pair_commit")
    peer_info = _peer_info(message)
    peer_commit = str(message.get("commit", ""))
    await conn.send(channel.seal({"type": "pair_reveal", "nonce": nonce.hex()}))
    message = await conn.message(channel)
    try:
        peer_nonce = bytes.fromhex(str(message["nonce"]))
    except (KeyError, ValueError):
        raise ChannelError("malformed pair_reveal message") from None
    if message.get("type") != "pair_reveal" or \
            commitment(channel.peer_key, peer_nonce).hex() != peer_commit:
        await _tell(conn, channel, "malformed", "the revealed nonce does not match its commitment")
        raise ChannelError("the peer's nonce does not match its commitment")
    sas = short_auth_string(mine, nonce, channel.peer_key, peer_nonce)
    ok = await pairing.confirm(sas, peer_info)
    await conn.send(channel.seal({"type": "pair_confirm", "ok": ok}))
    message = await conn.message(channel)
    if message.get("type") != "pair_confirm":
        raise ChannelError("expected pair_confirm")
    if not ok:
        raise ChannelError("pairing cancelled: the digits were not confirmed here")
    if message.get("ok") is not True:
        raise ChannelError("pairing cancelled: the digits were not confirmed on the other device")
    responder_info, initiator_info = ((pairing.info, peer_info) if not initiator
                                      else (peer_info, pairing.info))
    sponsor = _sponsor_is_responder(responder_info, initiator_info) != initiator
    if sponsor:
        user_id, user_key = pairing.sponsor(channel.peer_key, peer_info)
        await conn.send(channel.seal({"type": "pair_welcome", "user_id": user_id,
                                      "user_key": user_key.hex()}))
    else:
        message = await conn.message(channel)
        try:
            if message.get("type") != "pair_welcome":
                raise ValueError
            pairing.join(bytes.fromhex(str(message["user_key"])), str(message["user_id"]))
        except (KeyError, ValueError):
            raise ChannelError("malformed pair_welcome message") from None
    await _exchange(conn, channel, pairing.state)
    return PairResult(sas, channel.peer_key, peer_info, "sponsor" if sponsor else "joined",
                      conn.stats)


async def pair_with(host: str, port: int, device_key: Ed25519PrivateKey,
                    pairing: Pairing) -> PairResult:
    """Pair with a pod that is waiting to pair (raises ChannelError, OSError)."""
    stats = SyncStats()
    conn, channel = await _connect(host, port, device_key, lambda _: None, "pair", stats)
    try:
        return await _pair(conn, channel, device_key, pairing, initiator=True)
    finally:
        await conn.close()


class SyncServer:
    """Accepts sync sessions for one pod's state on a TCP port; and pairing sessions
    while :attr:`pairing` is set."""

    def __init__(self, state: SyncState | Replica, device_key: Ed25519PrivateKey,
                 pinning: Pinning,
                 on_sync: Callable[[SyncStats], None] | None = None,
                 on_refused: Callable[[str, str], None] | None = None) -> None:
        """``on_sync(stats)`` follows each completed session; ``on_refused(reason,
        peer)`` each failed one (``peer``: the device key in hex once known, else "")."""
        self.state, self.device_key, self.pinning = _state(state), device_key, pinning
        self.on_sync, self.on_refused = on_sync, on_refused
        self.server: asyncio.Server | None = None
        self.lock = asyncio.Lock()  # one merge at a time
        self.pairing: Pairing | None = None
        self.paired: asyncio.Queue[PairResult | BaseException] = asyncio.Queue()

    @property
    def replica(self) -> Replica:
        return self.state.begin()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self.server = await asyncio.start_server(self._serve, host, port)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def _pin(self, hs: Handshake, device: bytes) -> str | None:
        if hs.purpose == "pair":
            return None if self.pairing is not None else "this pod is not pairing now"
        return self.pinning(device)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stats = SyncStats()
        conn = _Conn(reader, writer, stats)
        pairing = False
        try:
            hs: Handshake = Handshake(self.device_key, lambda d: self._pin(hs, d),
                                      initiator=False, explain_refusal=True)

            async def handshake() -> SecureChannel:
                await conn.send(hs.reply(await conn.frame()))
                return hs.accept(await conn.frame())

            channel = await asyncio.wait_for(handshake(), HANDSHAKE_TIMEOUT)
            stats.peer = channel.peer_key.hex()
            if hs.refusal is not None:
                code = "not_pairing" if hs.purpose == "pair" else refusal_code(hs.refusal)
                await _tell(conn, channel, code, hs.refusal)
                raise ChannelError(f"refused {stats.peer[:16]}: {hs.refusal}")
            if hs.purpose == "pair" and self.pairing is not None:
                pairing = True
                async with self.lock:
                    result = await _pair(conn, channel, self.device_key, self.pairing,
                                         initiator=False)
                self.paired.put_nowait(result)
                return
            async with self.lock:
                await asyncio.wait_for(_exchange(conn, channel, self.state), SESSION_TIMEOUT)
            if self.on_sync:
                self.on_sync(stats)
        except (TimeoutError, ChannelError, OSError) as exc:
            if pairing:
                self.paired.put_nowait(exc)
            if self.on_refused:
                self.on_refused(str(exc), stats.peer)
        except Exception as exc:
            if not pairing:
                raise
            self.paired.put_nowait(exc)  # e.g. the person could not be asked to confirm
        finally:
            await conn.close()
