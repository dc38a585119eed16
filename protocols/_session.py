"""Sessions over TCP (asyncio): syncing (vector / delta / ack) and pairing.

A sync session: both sides send their version vector (and which user key they hold),
answer the other's with a delta (in chunks of at most ``MAX_ENTRIES`` entries), merge
the delta they receive, checking every entry against the device the channel
authenticated, and acknowledge it; an acknowledgement carries the current user key when
the peer is a current device that lacks it (after a revocation replaced the key). The
session ends when both deltas are acknowledged. What a session moved is returned (and
reported to ``on_sync``) as sizes, refusal counts and collection names only, for the
audit log.

A pairing session (``purpose: pair``) accepts any device key for the handshake, then
runs commit / reveal / confirm: each side commits to its nonce and to what it says about
itself, both derive a pair of 6-digit codes, each shows one, and the person types on
each device the code the other one shows. Only if both typed codes match does the
sponsoring side (the one holding the user key) certify the other and hand it the user
key, within that same authenticated channel; the two then sync as usual over it. A
server runs one pairing session at a time, and none after one succeeded.

The replicated state is reached through a :class:`SyncState`: ``begin`` hands out the
replica with the pod's latest local edits published into it, ``merged`` persists what a
delta changed. :class:`MemoryState` is the in-memory one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from covey.protocols._channel import (
    MAX_MESSAGE,
    ChannelError,
    FrameReader,
    Handshake,
    Pinning,
    SecureChannel,
)
from covey.protocols._crdt import Delta, Entry, MergeResult, Replica
from covey.protocols._hlc import HLC
from covey.protocols._identity import canonical, commitment, device_id_of, pairing_codes

__all__ = ["HANDSHAKE_TIMEOUT", "MAX_ENTRIES", "MemoryState", "PairResult", "Pairing",
           "PairingBroken", "PairingRefused", "RefusedError", "SyncServer", "SyncState",
           "SyncStats", "pair_with", "sync_with"]

HANDSHAKE_TIMEOUT = 10.0
SESSION_TIMEOUT = 30.0  # the most a sync session may take once authenticated
MAX_ENTRIES = 10_000  # entries in one delta message; larger deltas are split
# Bytes of entries in one delta message: room left under MAX_MESSAGE for the envelope
# and the version vector (a few hundred bytes per node).
_CHUNK_BYTES = MAX_MESSAGE - (64 << 10)


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
    dropped: int = 0  # held entries dropped: a revocation that came did not keep them
    sent: int = 0
    collections: set[str] = field(default_factory=set)
    refused: Counter[str] = field(default_factory=Counter)  # received entries refused, by why
    sent_user_key: bool = False  # the current user key went to the peer (it lacked it)
    received_user_key: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"peer": self.peer, "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "received": self.received, "changed": self.changed,
                "dropped": self.dropped, "sent": self.sent,
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


def _chunks(entries: tuple[Entry, ...]) -> list[tuple[Entry, ...]]:
    """A delta's entries in messages of at most MAX_ENTRIES entries and _CHUNK_BYTES bytes
    (an entry's size as the channel writes it, and its comma), at least one each."""
    chunks: list[tuple[Entry, ...]] = []
    start, size = 0, 0
    for i, entry in enumerate(entries):
        length = len(json.dumps(entry.to_dict(), separators=(",", ":"))) + 1
        if i > start and (i - start >= MAX_ENTRIES or size + length > _CHUNK_BYTES):
            chunks.append(entries[start:i])
            start, size = i, 0
        size += length
    chunks.append(entries[start:])
    return chunks


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
                chunks = _chunks(delta.entries)
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
                stats.dropped += len(result.dropped)
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


class PairingRefused(ChannelError):
    """Pairing stopped on purpose: the codes did not match, or both devices already
    belong to a user. The message says which, to a person."""


class PairingBroken(ChannelError):
    """A pairing connection failed before any code was shown (the peer stalled, broke
    the protocol, or was not pairing): the pod goes on waiting for the right device."""


@dataclass
class Pairing:
    """One side's part in pairing.

    ``info`` is what this side tells the other, committed to before the codes are drawn:
    ``name`` (the device's name) and ``has_user`` (it holds a user key). The side holding
    a user key sponsors; if both do, pairing stops (a pod never takes a second user key);
    if neither does, the responder sponsors.
    ``confirm(shown, peer_info, role)`` shows ``shown`` (this side's 6 digits) to the
    person and returns what the person typed: the digits the *other* device shows.
    ``role`` is "sponsor" (this side will hand over the user key) or "join". Nothing is
    trusted or handed over unless the digits typed on both sides match.
    ``sponsor(peer_key, peer_info)`` certifies the peer and returns the user id and the
    user key's private bytes; ``join(user_key, user_id)`` adopts them.
    """

    info: dict[str, Any]
    state: SyncState
    confirm: Callable[[str, dict[str, Any], str], Awaitable[str]]
    sponsor: Callable[[bytes, dict[str, Any]], tuple[str, bytes]]
    join: Callable[[bytes, str], None]


@dataclass
class PairResult:
    """What pairing did: the code this side showed, the peer, and this side's role."""

    sas: str
    peer_key: bytes
    peer_info: dict[str, Any]
    role: str  # "sponsor" or "joined"
    stats: SyncStats


_PEER_INFO = {"name": str, "has_user": bool}


def _peer_info(message: dict[str, Any]) -> dict[str, Any]:
    info = message.get("info")
    if not isinstance(info, dict) or set(info) != set(_PEER_INFO) or \
            any(not isinstance(info.get(k), t) for k, t in _PEER_INFO.items()):
        raise ChannelError("malformed pair_commit message")
    return {k: info[k] for k in _PEER_INFO}


def _digits(text: str) -> str:
    return "".join(c for c in text if not c.isspace())


async def _pair(conn: _Conn, channel: SecureChannel, device_key: Ed25519PrivateKey,
                pairing: Pairing, initiator: bool) -> PairResult:
    try:
        sponsor, shown, expected, peer_info = await _commit_reveal(conn, channel, device_key,
                                                                   pairing, initiator)
    except RefusedError as exc:
        if exc.code == "both_paired":
            raise PairingRefused(f"pairing stopped: {exc.reason}") from None
        raise PairingBroken(str(exc)) from None
    except (TimeoutError, OSError) as exc:
        raise PairingBroken(f"the peer broke off before the codes ({type(exc).__name__})"
                            ) from None
    except ChannelError as exc:
        if isinstance(exc, PairingRefused):
            raise
        raise PairingBroken(str(exc)) from None
    typed = await pairing.confirm(shown, peer_info, "sponsor" if sponsor else "join")
    ok = hmac.compare_digest(_digits(typed), expected)
    await conn.send(channel.seal({"type": "pair_confirm", "ok": ok}))
    message = await conn.message(channel)
    if message.get("type") != "pair_confirm":
        raise ChannelError("expected pair_confirm")
    if not ok:
        raise PairingRefused("pairing cancelled: the code typed here is not the one the "
                             "device at the other end of this connection shows")
    if message.get("ok") is not True:
        raise PairingRefused("pairing cancelled: the code typed on the other device did not "
                             "match")
    if sponsor:
        user_id, user_key = pairing.sponsor(channel.peer_key, peer_info)
        await conn.send(channel.seal({"type": "pair_welcome", "user_id": user_id,
                                      "user_key": user_key.hex()}))
    else:
        message = await conn.message(channel)
        try:
            if message.get("type") != "pair_welcome":
                raise ValueError
            private, user_id = bytes.fromhex(str(message["user_key"])), str(message["user_id"])
        except (KeyError, ValueError):
            raise ChannelError("malformed pair_welcome message") from None
        pairing.join(private, user_id)
    await _exchange(conn, channel, pairing.state)
    return PairResult(shown, channel.peer_key, peer_info, "sponsor" if sponsor else "joined",
                      conn.stats)


async def _commit_reveal(conn: _Conn, channel: SecureChannel, device_key: Ed25519PrivateKey,
                         pairing: Pairing, initiator: bool
                         ) -> tuple[bool, str, str, dict[str, Any]]:
    """Commit, reveal, choose the sponsor; (sponsor?, code shown, code expected, peer info)."""
    mine = device_key.public_key().public_bytes_raw()
    nonce = os.urandom(16)
    info = {k: pairing.info[k] for k in _PEER_INFO}
    await conn.send(channel.seal({"type": "pair_commit", "info": info,
                                  "commit": commitment(mine, nonce, canonical(info)).hex()}))
    # Up to the codes, a peer that stalls is cut off: it would keep the pod busy, and
    # every other device away, while the person waits for a code that never shows.
    message = await asyncio.wait_for(conn.message(channel), HANDSHAKE_TIMEOUT)
    if message.get("type") != "pair_commit":
        raise ChannelError("expected pair_commit")
    peer_info = _peer_info(message)
    peer_commit = str(message.get("commit", ""))
    await conn.send(channel.seal({"type": "pair_reveal", "nonce": nonce.hex()}))
    message = await asyncio.wait_for(conn.message(channel), HANDSHAKE_TIMEOUT)
    try:
        peer_nonce = bytes.fromhex(str(message["nonce"]))
    except (KeyError, ValueError):
        raise ChannelError("malformed pair_reveal message") from None
    # The codes commit to the key the channel authenticated and to what the peer said
    # about itself, so the sponsor below is the peer the person checks the codes of.
    if message.get("type") != "pair_reveal" or not hmac.compare_digest(
            commitment(channel.peer_key, peer_nonce, canonical(peer_info)).hex(), peer_commit):
        await _tell(conn, channel, "malformed", "the revealed nonce does not match its commitment")
        raise ChannelError("the peer's nonce does not match its commitment")
    if info["has_user"] and peer_info["has_user"]:
        await _tell(conn, channel, "both_paired", "both devices already belong to a user")
        raise PairingRefused("both devices already belong to a user, and a pod never takes "
                             "another user key; erase one (`covey pod forget`) to pair it")
    sponsor = info["has_user"] or (not peer_info["has_user"] and not initiator)
    shown, expected = pairing_codes(mine, nonce, channel.peer_key, peer_nonce)
    return sponsor, shown, expected, peer_info


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
    """Accepts sync sessions for one pod's state on a TCP port; and, while
    :attr:`pairing` is set, one pairing session at a time (:attr:`pairing_busy`), until
    one succeeds (then :attr:`pairing` is cleared: one pairing per request)."""

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
        self.pairing_busy = False  # a pairing session runs (here or as initiator)
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
            if self.pairing is None:
                return "this pod is not pairing now"
            return "this pod is pairing with another device now" if self.pairing_busy \
                else None
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
            if hs.purpose == "pair" and hs.refusal is None and self.pairing_busy:
                hs.refusal = "this pod is pairing with another device now"  # raced in
            if hs.refusal is not None:
                code = refusal_code(hs.refusal) if hs.purpose == "sync" else \
                    "busy" if "another device" in hs.refusal else "not_pairing"
                await _tell(conn, channel, code, hs.refusal)
                raise ChannelError(f"refused {stats.peer[:16]}: {hs.refusal}")
            if hs.purpose == "pair" and self.pairing is not None:
                pairing, request = True, self.pairing
                self.pairing_busy = True  # set before any await: no second session
                try:
                    async with self.lock:
                        result = await _pair(conn, channel, self.device_key, request,
                                             initiator=False)
                        self.pairing = None  # done: no further device pairs on this request
                finally:
                    self.pairing_busy = False
                self.paired.put_nowait(result)
                return
            async with self.lock:
                await asyncio.wait_for(_exchange(conn, channel, self.state), SESSION_TIMEOUT)
            if self.on_sync:
                self.on_sync(stats)
        except (TimeoutError, ChannelError, OSError) as exc:
            if pairing and not isinstance(exc, PairingBroken):  # else: wait for another
                self.paired.put_nowait(exc)
            if self.on_refused:
                self.on_refused(str(exc), stats.peer)
        except Exception as exc:
            if not pairing:
                raise
            self.paired.put_nowait(exc)  # e.g. the person could not be asked to confirm
        finally:
            await conn.close()
