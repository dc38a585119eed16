"""The sync channel between two pods: the Noise protocol, mutually authenticated, framed.

The handshake is ``Noise_XX_25519_ChaChaPoly_SHA256`` (the Noise Protocol Framework,
revision 34, through the ``noiseprotocol`` package) with the prologue
``covey-sync/2``, written sans-IO so it can be tested without sockets:

1. initiator -> responder: ``-> e``, with a clear payload naming the protocol and the
   purpose (``sync`` or ``pair``); the payload is bound into the handshake hash.
2. responder -> initiator: ``<- e, ee, s, es`` with an encrypted *identity* payload.
3. initiator -> responder: ``-> s, se`` with its encrypted identity payload.

Each side's Noise static key is a fresh X25519 key. Its identity payload carries the
device's Ed25519 public key and an Ed25519 signature over
``"covey-noise-static:" || the X25519 static public key``, which binds the device
identity to the key Noise authenticated (the construction libp2p uses). Each side then
checks the other's device key against its pins (the user's paired, unrevoked devices)
and refuses with a reason otherwise.

Transport messages are Noise transport messages: ChaCha20-Poly1305 with Noise's
implicit 64-bit nonce counter, so a replayed, reordered, dropped or altered message
fails to decrypt and ends the channel. A frame is a 4-byte big-endian length and one
Noise message of at most ``MAX_FRAME`` (65,535) bytes; a JSON message longer than a
frame is split over several (its first plaintext byte says whether more follow), up to
``MAX_MESSAGE`` bytes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from noise.connection import Keypair, NoiseConnection

__all__ = ["MAX_FRAME", "MAX_MESSAGE", "NOISE_NAME", "PROTOCOL", "PURPOSES", "ChannelError",
           "FrameReader", "Handshake", "Pinning", "SecureChannel"]

PROTOCOL = "covey-sync/2"
PURPOSES = ("sync", "pair")
NOISE_NAME = b"Noise_XX_25519_ChaChaPoly_SHA256"
MAX_FRAME = 65535  # bytes of one Noise message (the Noise limit)
MAX_MESSAGE = 1 << 20  # bytes of one JSON message, over as many frames as it takes
_CHUNK = MAX_FRAME - 16 - 1  # plaintext per frame: the AEAD tag and the "more" byte
_STATIC_LABEL = b"covey-noise-static:"

#: Decides whether a peer's device key may talk to us: None to accept, else the reason.
Pinning = Callable[[bytes], str | None]


class ChannelError(ValueError):
    """The peer broke the protocol, failed authentication or was refused."""


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
    """Seals and opens JSON messages once the handshake is done."""

    def __init__(self, noise: NoiseConnection, peer_key: bytes) -> None:
        self._noise = noise
        self._partial = b""
        self.peer_key = peer_key

    def seal(self, message: dict[str, Any]) -> bytes:
        """The frames carrying ``message`` (one, unless it is long)."""
        data = json.dumps(message, separators=(",", ":")).encode()
        if len(data) > MAX_MESSAGE:
            raise ChannelError(f"message of {len(data)} bytes over the {MAX_MESSAGE} limit")
        chunks = [data[i:i + _CHUNK] for i in range(0, len(data), _CHUNK)] or [b""]
        return b"".join(_frame(bytes(self._noise.encrypt(
            (b"\1" if i < len(chunks) - 1 else b"\0") + chunk)))
            for i, chunk in enumerate(chunks))

    def open(self, payload: bytes) -> dict[str, Any] | None:
        """The message a frame completes, or None while more frames of it are due.

        Raises:
            ChannelError: the frame fails authentication (altered, replayed, out of
                order), the message is too long, or it is not a JSON object.
        """
        try:
            plain = bytes(self._noise.decrypt(payload))
        except Exception:
            raise ChannelError("a frame failed authentication (altered, replayed or out of "
                               "order)") from None
        if not plain or plain[0] not in (0, 1):
            raise ChannelError("malformed frame")
        self._partial += plain[1:]
        if len(self._partial) > MAX_MESSAGE:
            raise ChannelError(f"a message over the {MAX_MESSAGE} limit")
        if plain[0] == 1:
            return None
        data, self._partial = self._partial, b""
        return _json(data, "message")


class Handshake:
    """One side of the handshake. ``initiator`` starts it with :meth:`hello`."""

    def __init__(self, device_key: Ed25519PrivateKey, pinning: Pinning,
                 initiator: bool, purpose: str = "sync", explain_refusal: bool = False) -> None:
        """``purpose`` ("sync" or "pair") is the initiator's, sent in its first message
        and bound into the handshake hash; a responder learns it from that message.
        With ``explain_refusal`` a refused peer still gets a channel, with
        :attr:`refusal` set, so the caller can tell it why before closing."""
        if purpose not in PURPOSES:
            raise ValueError(f"purpose must be one of {PURPOSES}")
        self.device = device_key
        self.pinning, self.initiator = pinning, initiator
        self.purpose, self.explain_refusal = purpose, explain_refusal
        self.refusal: str | None = None
        self.peer_key = b""
        self._state: Any = None
        static = X25519PrivateKey.generate()
        self._static_public = static.public_key().public_bytes_raw()
        self._noise = NoiseConnection.from_name(NOISE_NAME)
        (self._noise.set_as_initiator if initiator else self._noise.set_as_responder)()
        self._noise.set_keypair_from_private_bytes(Keypair.STATIC, static.private_bytes_raw())
        self._noise.set_prologue(PROTOCOL.encode())
        self._noise.start_handshake()

    # -- identity payloads -------------------------------------------------------------

    def _identity(self) -> bytes:
        device = self.device.public_key().public_bytes_raw()
        signature = self.device.sign(_STATIC_LABEL + self._static_public)
        return json.dumps({"device": device.hex(), "sig": signature.hex()}).encode()

    def _read(self, message: bytes, what: str) -> bytes:
        # Held before reading: the library drops its handshake state once it completes.
        self._state = getattr(self._noise.noise_protocol, "handshake_state", None)
        try:
            return bytes(self._noise.read_message(message))
        except Exception:
            raise ChannelError(f"handshake failed: the peer's {what} does not "
                               "authenticate") from None

    def _check_identity(self, payload: bytes) -> None:
        remote = getattr(getattr(self._state, "rs", None), "public_bytes", None)
        if remote is None:
            raise ChannelError("handshake failed: no static key from the peer")
        found = _json(payload, "identity")
        try:
            device = bytes.fromhex(str(found["device"]))
            Ed25519PublicKey.from_public_bytes(device).verify(
                bytes.fromhex(str(found["sig"])), _STATIC_LABEL + bytes(remote))
        except (KeyError, ValueError, InvalidSignature):
            raise ChannelError("handshake failed: the peer's signature does not "
                               "verify") from None
        self.peer_key = device
        self.refusal = self.pinning(device)
        if self.refusal is not None and not self.explain_refusal:
            raise ChannelError(f"refused: {self.refusal}")

    # initiator: hello -> (reply) -> finish ; responder: (hello) -> reply -> (accept)

    def hello(self) -> bytes:
        """Initiator: the first frame (``-> e`` and the purpose)."""
        opening = json.dumps({"protocol": PROTOCOL, "purpose": self.purpose}).encode()
        return _frame(bytes(self._noise.write_message(opening)))

    def reply(self, hello: bytes) -> bytes:
        """Responder: answer the initiator's first frame (``<- e, ee, s, es``)."""
        found = _json(self._read(hello, "opening"), "hello")
        if found.get("protocol") != PROTOCOL:
            raise ChannelError(f"unsupported protocol {found.get('protocol')!r}")
        purpose = found.get("purpose", "sync")
        if purpose not in PURPOSES:
            raise ChannelError(f"unknown purpose {purpose!r}")
        self.purpose = str(purpose)
        return _frame(bytes(self._noise.write_message(self._identity())))

    def finish(self, reply: bytes) -> tuple[bytes, SecureChannel]:
        """Initiator: check the responder, prove ourselves; our last frame and channel."""
        self._check_identity(self._read(reply, "reply"))
        last = _frame(bytes(self._noise.write_message(self._identity())))
        return last, SecureChannel(self._noise, self.peer_key)

    def accept(self, last: bytes) -> SecureChannel:
        """Responder: check the initiator's identity; the channel."""
        payload = self._read(last, "identity")
        self._check_identity(payload)
        return SecureChannel(self._noise, self.peer_key)
