"""The sync channel between two pods: mutually authenticated, encrypted, framed.

A SIGMA-style handshake (Krawczyk 2003, the pattern of TLS 1.3 and Noise XX) over any
byte stream, written sans-IO so it can be tested without sockets:

1. initiator -> responder: ``hello``: version, an ephemeral X25519 key, a nonce.
2. responder -> initiator: its ephemeral key and nonce in clear; then, encrypted under a
   handshake key from the ephemeral Diffie-Hellman, its device key and an Ed25519
   signature over the transcript hash.
3. initiator -> responder: encrypted, its device key and signature over the transcript.

Each side then checks the other's device key against its pins (the user's paired,
unrevoked devices) and refuses with a reason otherwise. Traffic keys are derived from
the shared secret and the whole transcript, one per direction (HKDF-SHA256).

Frames are a 4-byte big-endian length and a ChaCha20-Poly1305 ciphertext of at most
``MAX_FRAME`` bytes. The nonce is the frame's sequence number, never sent: a replayed,
reordered, dropped or altered frame fails to decrypt and ends the channel.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["MAX_FRAME", "PROTOCOL", "PURPOSES", "ChannelError", "FrameReader", "Handshake",
           "Pinning", "SecureChannel"]

PROTOCOL = "covey-sync/1"
PURPOSES = ("sync", "pair")
MAX_FRAME = 1 << 20  # bytes of ciphertext in one frame
_AAD = PROTOCOL.encode()

#: Decides whether a peer's device key may talk to us: None to accept, else the reason.
Pinning = Callable[[bytes], str | None]


class ChannelError(ValueError):
    """The peer broke the protocol, failed authentication or was refused."""


def _hkdf(secret: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(hashes.SHA256(), length, salt=None, info=info).derive(secret)


def _frame(payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME:
        raise ChannelError(f"frame of {len(payload)} bytes over the {MAX_FRAME} limit")
    return struct.pack(">I", len(payload)) + payload


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ChannelError(f"malformed {what}") from None
    if not isinstance(value, dict):
        raise ChannelError(f"malformed {what}")
    return value


class FrameReader:
    """Splits a byte stream into frames, refusing any longer than ``MAX_FRAME``."""

    def __init__(self) -> None:
        self.buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        self.buffer += data
        frames = []
        while len(self.buffer) >= 4:
            (size,) = struct.unpack(">I", self.buffer[:4])
            if size > MAX_FRAME:
                raise ChannelError(f"frame of {size} bytes announced, over the limit")
            if len(self.buffer) < 4 + size:
                break
            frames.append(self.buffer[4:4 + size])
            self.buffer = self.buffer[4 + size:]
        return frames


class SecureChannel:
    """Seals and opens frames of JSON messages once the handshake is done."""

    def __init__(self, send_key: bytes, recv_key: bytes, peer_key: bytes) -> None:
        self._send, self._recv = ChaCha20Poly1305(send_key), ChaCha20Poly1305(recv_key)
        self._sent = self._received = 0
        self.peer_key = peer_key

    def seal(self, message: dict[str, Any]) -> bytes:
        """One frame carrying ``message``."""
        nonce = self._sent.to_bytes(12, "big")
        self._sent += 1
        data = json.dumps(message, separators=(",", ":")).encode()
        return _frame(self._send.encrypt(nonce, data, _AAD))

    def open(self, payload: bytes) -> dict[str, Any]:
        """The message in the next frame's payload (raises ChannelError)."""
        nonce = self._received.to_bytes(12, "big")
        try:
            data = self._recv.decrypt(nonce, payload, _AAD)
        except InvalidTag:
            raise ChannelError("a frame failed authentication (altered, replayed or out of "
                               "order)") from None
        self._received += 1
        return _json(data, "message")


@dataclass
class _Side:
    device: Ed25519PrivateKey
    ephemeral: X25519PrivateKey
    nonce: bytes


class Handshake:
    """One side of the handshake. ``initiator`` starts it with :meth:`hello`."""

    def __init__(self, device_key: Ed25519PrivateKey, pinning: Pinning,
                 initiator: bool, purpose: str = "sync", explain_refusal: bool = False) -> None:
        """``purpose`` ("sync" or "pair") is the initiator's, sent in its hello and bound
        into the transcript; a responder learns it from the hello. With
        ``explain_refusal`` a refused peer still gets a channel, with :attr:`refusal`
        set, so the caller can tell it why before closing."""
        if purpose not in PURPOSES:
            raise ValueError(f"purpose must be one of {PURPOSES}")
        self.me = _Side(device_key, X25519PrivateKey.generate(), os.urandom(16))
        self.pinning, self.initiator = pinning, initiator
        self.purpose, self.explain_refusal = purpose, explain_refusal
        self.refusal: str | None = None
        self.transcript = hashlib.sha256(_AAD)
        self._hs_key = b""
        self._secret = b""
        self.peer_key = b""

    def _absorb(self, data: bytes) -> None:
        self.transcript.update(struct.pack(">I", len(data)) + data)

    def _eph(self) -> bytes:
        return self.me.ephemeral.public_key().public_bytes_raw()

    def _identity(self, label: bytes) -> bytes:
        device = self.me.device.public_key().public_bytes_raw()
        signature = self.me.device.sign(label + self.transcript.digest())
        sealed = ChaCha20Poly1305(_hkdf(self._hs_key, label)).encrypt(
            b"\0" * 12, json.dumps({"device": device.hex(), "sig": signature.hex()}).encode(),
            _AAD)
        return sealed

    def _check_identity(self, sealed: bytes, label: bytes) -> None:
        try:
            data = ChaCha20Poly1305(_hkdf(self._hs_key, label)).decrypt(b"\0" * 12, sealed,
                                                                       _AAD)
        except InvalidTag:
            raise ChannelError("handshake failed: the peer does not share our key "
                               "exchange") from None
        found = _json(data, "identity")
        try:
            device = bytes.fromhex(str(found["device"]))
            Ed25519PublicKey.from_public_bytes(device).verify(
                bytes.fromhex(str(found["sig"])), label + self.transcript.digest())
        except (KeyError, ValueError, InvalidSignature):
            raise ChannelError("handshake failed: the peer's signature does not "
                               "verify") from None
        self.peer_key = device
        self.refusal = self.pinning(device)
        if self.refusal is not None and not self.explain_refusal:
            raise ChannelError(f"refused: {self.refusal}")

    def _shared(self, peer_eph: bytes) -> None:
        try:
            shared = self.me.ephemeral.exchange(X25519PublicKey.from_public_bytes(peer_eph))
        except ValueError:
            raise ChannelError("handshake failed: bad ephemeral key") from None
        self._secret = shared
        self._hs_key = _hkdf(shared, b"handshake" + self.transcript.digest())

    # initiator: hello -> (reply) -> finish ; responder: (hello) -> reply -> (finish)

    def hello(self) -> bytes:
        data = json.dumps({"protocol": PROTOCOL, "purpose": self.purpose,
                           "eph": self._eph().hex(), "nonce": self.me.nonce.hex()}).encode()
        self._absorb(data)
        return _frame(data)

    def reply(self, hello: bytes) -> bytes:
        """Responder: answer the initiator's hello frame payload."""
        found = _json(hello, "hello")
        if found.get("protocol") != PROTOCOL:
            raise ChannelError(f"unsupported protocol {found.get('protocol')!r}")
        purpose = found.get("purpose", "sync")
        if purpose not in PURPOSES:
            raise ChannelError(f"unknown purpose {purpose!r}")
        self.purpose = str(purpose)
        self._absorb(hello)
        head = json.dumps({"eph": self._eph().hex(), "nonce": self.me.nonce.hex()}).encode()
        self._absorb(head)
        try:
            peer_eph = bytes.fromhex(str(found["eph"]))
        except (KeyError, ValueError):
            raise ChannelError("malformed hello") from None
        self._shared(peer_eph)
        identity = self._identity(b"responder")
        self._absorb(identity)
        return _frame(head) + _frame(identity)

    def finish(self, head: bytes, identity: bytes) -> tuple[bytes, SecureChannel]:
        """Initiator: check the responder, prove ourselves; our last frame and channel."""
        found = _json(head, "reply")
        self._absorb(head)
        try:
            self._shared(bytes.fromhex(str(found["eph"])))
        except (KeyError, ValueError):
            raise ChannelError("malformed reply") from None
        self._check_identity(identity, b"responder")
        self._absorb(identity)
        mine = self._identity(b"initiator")
        self._absorb(mine)
        return _frame(mine), self._channel()

    def accept(self, identity: bytes) -> SecureChannel:
        """Responder: check the initiator's identity; the channel."""
        self._check_identity(identity, b"initiator")
        self._absorb(identity)
        return self._channel()

    def _channel(self) -> SecureChannel:
        digest = self.transcript.digest()
        a_to_b = _hkdf(self._secret, b"initiator->responder" + digest)
        b_to_a = _hkdf(self._secret, b"responder->initiator" + digest)
        send, recv = (a_to_b, b_to_a) if self.initiator else (b_to_a, a_to_b)
        return SecureChannel(send, recv, self.peer_key)
