"""One user, many devices: the user key certifies each pod's device key; revoking a
device replaces the user key.

- The *user key* (Ed25519) is made on the user's first pod. The *user id* is a hash of
  its public half and of that first device's public key, and never changes: later user
  keys hang off the first one in a chain (see :class:`Revocation`), so the id stays the
  user's identity. Pairing gives a new pod the current user key over the authenticated
  channel, after the person typed on each device the code the other one shows.
- A *device certificate* binds a device id and its Ed25519 public key to the user id,
  signed by a user key (``signer`` names which). The user's devices are those certified
  by the current user key (``devices`` in the replicated state).
- A *revocation* removes a device for good *and* replaces the user key: it is signed by
  the key it retires (``previous_key``) and names the next one (``next_key``). The
  revocations therefore form the key chain, first key to current key.
- The *pairing codes* are 6 digits each side shows, derived from both device keys and
  both fresh nonces; each side commits to its nonce (and to what it says about itself)
  before seeing the other's, so an attacker in the middle matches a code only by chance
  (one in a million per attempt).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from covey._time import utc_timestamp

__all__ = ["DeviceCertificate", "Revocation", "UserKey", "b64", "commitment", "device_id_of",
           "pairing_codes", "unb64", "user_id_of", "verify_signature"]

_CONTEXT = b"covey-pair-v2"
_KEPT = re.compile(r"[0-9a-f]{32}( [0-9a-f]{32})*")  # a revocation's ``kept``, when not ""
_S = TypeVar("_S", bound="_Signed")


def b64(data: bytes) -> str:
    """Standard base64, as text."""
    return base64.b64encode(data).decode()


def unb64(text: str, size: int | None = None) -> bytes:
    """Decode base64 (raises ValueError, also when it is not ``size`` bytes long)."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None
    if size is not None and len(raw) != size:
        raise ValueError(f"expected {size} bytes, got {len(raw)}")
    return raw


def canonical(value: Any) -> bytes:
    """The one byte form of a JSON value that signatures cover (sorted keys, no spaces)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def user_id_of(user_public_key: bytes, first_device_key: bytes) -> str:
    """The user id: 16 bytes of SHA-256 over the first user key and the first device key.

    Committing to the first device means nobody holding the user key can later present
    another device as the one the user started with.
    """
    return hashlib.sha256(b"covey-user:" + user_public_key + first_device_key).hexdigest()[:32]


def device_id_of(public_key: bytes) -> str:
    """The stable device id of a device's public key."""
    return "dev-" + hashlib.sha256(public_key).hexdigest()[:20]


def verify_signature(public_key: bytes, signature: str, data: bytes) -> bool:
    """Whether ``signature`` (base64) is ``public_key``'s Ed25519 signature of ``data``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(unb64(signature, 64), data)
    except (InvalidSignature, ValueError):
        return False
    return True


@functools.lru_cache(maxsize=4096)  # the trust is derived again and again from the same few
def _statement_verifies(public_key: bytes, signature: str, data: bytes) -> bool:
    return verify_signature(public_key, signature, data)


class _Signed:
    """A statement signed by a user key: canonical JSON of all but ``signature``."""

    WHAT = "statement"
    user_id: str
    signature: str

    def signed_bytes(self) -> bytes:
        return canonical({k: v for k, v in asdict(self).items()  # type: ignore[call-overload]
                          if k != "signature"})

    def to_dict(self) -> dict[str, str]:
        return dict(asdict(self))  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[_S], d: Any) -> _S:
        """Parse a received statement: exactly its fields, all strings (raises ValueError)."""
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        if not isinstance(d, dict) or set(d) != names or \
                not all(isinstance(v, str) for v in d.values()):
            raise ValueError(f"not a {cls.WHAT}")
        return cls(**d)

    def _check(self, public_key: bytes) -> None:
        if not _statement_verifies(public_key, self.signature, self.signed_bytes()):
            raise ValueError(f"the {self.WHAT} is not signed by the key it names")


@dataclass(frozen=True)
class DeviceCertificate(_Signed):
    """A user key's statement that a device key belongs to the user."""

    WHAT = "device certificate"
    user_id: str
    device_id: str
    device_public_key: str  # base64 raw Ed25519
    name: str
    issued_at: str
    signer: str  # base64 raw Ed25519: the user key that signed
    signature: str = ""  # base64, over every other field

    def verify(self) -> bytes:
        """Check the signature and the device id; the signing user key (raises ValueError)."""
        if device_id_of(unb64(self.device_public_key, 32)) != self.device_id:
            raise ValueError("the device id does not match the device key")
        signer = unb64(self.signer, 32)
        self._check(signer)
        return signer

    @property
    def device_key(self) -> bytes:
        return unb64(self.device_public_key, 32)


@dataclass(frozen=True)
class Revocation(_Signed):
    """A user key's statement that a device is no longer the user's; it retires that key.

    ``kept`` names (space-separated content keys of ``kept_entries`` entries) the lists of
    the revoked device's entries the revoking pod held when it revoked it: those, and no
    other entry that device signed, count from then on, whatever their timestamps say.
    """

    WHAT = "revocation"
    user_id: str
    device_id: str
    reason: str
    revoked_at: str
    kept: str  # the keys of the lists of the device's entries that still count
    previous_key: str  # base64: the user key retired, which signs this
    next_key: str  # base64: the user key from now on
    signature: str = ""

    def verify(self) -> bytes:
        """Check the form and the signature; the retired key (raises ValueError)."""
        if self.kept and not _KEPT.fullmatch(self.kept):
            raise ValueError("a revocation's kept lists are named by 32 hex digits each")
        previous = unb64(self.previous_key, 32)
        if unb64(self.next_key, 32) == previous:
            raise ValueError("a revocation must replace the user key")
        self._check(previous)
        return previous



class UserKey:
    """A user key (held by every paired pod, encrypted at rest) and the user id it serves."""

    def __init__(self, private: Ed25519PrivateKey, user_id: str) -> None:
        self._key = private
        self.user_id = user_id

    @classmethod
    def generate_for(cls, first_device_key: bytes) -> UserKey:
        """The first key of a new user, whose id commits to its first device."""
        private = Ed25519PrivateKey.generate()
        return cls(private, user_id_of(private.public_key().public_bytes_raw(),
                                       first_device_key))

    @classmethod
    def from_bytes(cls, raw: bytes, user_id: str) -> UserKey:
        return cls(Ed25519PrivateKey.from_private_bytes(raw), user_id)

    def private_bytes(self) -> bytes:
        return self._key.private_bytes(serialization.Encoding.Raw,
                                       serialization.PrivateFormat.Raw,
                                       serialization.NoEncryption())

    @property
    def public_key(self) -> bytes:
        return self._key.public_key().public_bytes_raw()

    def _sign(self, statement: _S) -> _S:
        signature = b64(self._key.sign(statement.signed_bytes()))
        return replace(statement, signature=signature)  # type: ignore[type-var]

    def certify(self, device_public_key: bytes, name: str) -> DeviceCertificate:
        """Certify a device of this user."""
        return self._sign(DeviceCertificate(
            self.user_id, device_id_of(device_public_key), b64(device_public_key), name,
            utc_timestamp("seconds"), b64(self.public_key)))

    def revoke(self, device_id: str, reason: str, kept: str = "") -> tuple[Revocation, UserKey]:
        """Revoke a device for good, keeping only its entries listed by ``kept``; the
        revocation and the user key that replaces this one."""
        successor = UserKey(Ed25519PrivateKey.generate(), self.user_id)
        revocation = self._sign(Revocation(
            self.user_id, device_id, reason, utc_timestamp("seconds"), kept, b64(self.public_key),
            b64(successor.public_key)))
        return revocation, successor


def commitment(device_public_key: bytes, nonce: bytes, info: bytes = b"") -> bytes:
    """What a side sends before revealing its nonce: SHA-256 of the context, its device
    key, its nonce and what it says about itself (so its claims are bound to the codes)."""
    return hashlib.sha256(_CONTEXT + b"commit" + device_public_key + nonce
                          + hashlib.sha256(info).digest()).digest()


def pairing_codes(mine: bytes, my_nonce: bytes, peer: bytes, peer_nonce: bytes
                  ) -> tuple[str, str]:
    """The 6 digits this side shows, and the 6 digits the other side shows (which the
    person types here). Both sides derive the same pair, in opposite roles."""
    ordered = sorted([(mine, my_nonce), (peer, peer_nonce)])
    digest = hashlib.sha256(_CONTEXT + b"".join(k + n for k, n in ordered)).digest()
    codes = [f"{int.from_bytes(digest[i:i + 8], 'big') % 1_000_000:06d}" for i in (0, 8)]
    first = ordered[0] == (mine, my_nonce)
    return (codes[0], codes[1]) if first else (codes[1], codes[0])

