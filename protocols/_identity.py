"""One user, many devices: the user identity key certifies each pod's device key.

- The *user key* (Ed25519) is made on the user's first pod. Its public half, hashed, is
  the user id every pod of the user carries. Pairing gives a new pod the user key over
  the authenticated channel, after the person confirmed the same short authentication
  string on both screens.
- A *device certificate* binds a device id and its Ed25519 public key to the user id,
  signed by the user key. The signed device list is the set of certificates (the
  ``devices`` collection of the replicated state).
- A *revocation* is signed by the user key too and never expires (``revocations``); a
  revoked device is refused from then on.
- The *short authentication string* (SAS) is 6 digits derived from both device keys and
  both fresh nonces; an attacker in the middle would have to match it by chance (one in
  a million per attempt), since each side commits to its nonce before seeing the other's.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = ["DeviceCertificate", "Revocation", "UserKey", "commitment", "short_auth_string",
           "user_id_of"]

_CONTEXT = b"covey-sas-v1"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _canonical(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def user_id_of(user_public_key: bytes) -> str:
    """The user id: the first 16 bytes of SHA-256 of the user's public key, in hex."""
    return hashlib.sha256(b"covey-user:" + user_public_key).hexdigest()[:32]


class _Signed:
    """Fields signed by the user key: canonical JSON of all but ``signature``."""

    WHAT = "statement"
    user_id: str
    signature: str

    def signed_bytes(self) -> bytes:
        return _canonical({k: v for k, v in asdict(self).items()  # type: ignore[call-overload]
                           if k != "signature"})

    def verify(self, user_public_key: bytes) -> None:
        """Raise ValueError unless the user key signed this for its user id."""
        if user_id_of(user_public_key) != self.user_id:
            raise ValueError(f"the {self.WHAT} names another user")
        _check(user_public_key, self.signature, self.signed_bytes(), self.WHAT)

    def to_dict(self) -> dict[str, str]:
        return dict(asdict(self))  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        return cls(**{k: str(d[k]) for k in cls.__dataclass_fields__})  # type: ignore[attr-defined]


@dataclass(frozen=True)
class DeviceCertificate(_Signed):
    """The user key's statement that a device key belongs to the user."""

    WHAT = "device certificate"
    user_id: str
    device_id: str
    device_public_key: str  # base64 raw Ed25519
    name: str
    issued_at: str
    signature: str = ""  # base64, over every other field


@dataclass(frozen=True)
class Revocation(_Signed):
    """The user key's statement that a device is no longer one of the user's."""

    WHAT = "revocation"
    user_id: str
    device_id: str
    reason: str
    revoked_at: str
    signature: str = ""


def _check(public_key: bytes, signature: str, data: bytes, what: str) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(base64.b64decode(signature), data)
    except (InvalidSignature, ValueError) as exc:
        raise ValueError(f"the {what} is not signed by the user's key") from exc


class UserKey:
    """The user identity key (held by every paired pod, encrypted at rest)."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._key = private

    @classmethod
    def generate(cls) -> UserKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_bytes(cls, raw: bytes) -> UserKey:
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    def private_bytes(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self._key.private_bytes(serialization.Encoding.Raw,
                                       serialization.PrivateFormat.Raw,
                                       serialization.NoEncryption())

    @property
    def public_key(self) -> bytes:
        return self._key.public_key().public_bytes_raw()

    @property
    def user_id(self) -> str:
        return user_id_of(self.public_key)

    def certify(self, device_id: str, device_public_key: bytes, name: str) -> DeviceCertificate:
        """Certify a device of this user."""
        cert = DeviceCertificate(self.user_id, device_id, _b64(device_public_key), name,
                                 datetime.now(UTC).isoformat(timespec="seconds"))
        signature = _b64(self._key.sign(cert.signed_bytes()))
        return DeviceCertificate(**{**asdict(cert), "signature": signature})

    def revoke(self, device_id: str, reason: str) -> Revocation:
        """Revoke a device of this user, for good."""
        rev = Revocation(self.user_id, device_id, reason,
                         datetime.now(UTC).isoformat(timespec="seconds"))
        signature = _b64(self._key.sign(rev.signed_bytes()))
        return Revocation(**{**asdict(rev), "signature": signature})


def commitment(device_public_key: bytes, nonce: bytes) -> bytes:
    """What a side sends before revealing its nonce: SHA-256(context, key, nonce)."""
    return hashlib.sha256(_CONTEXT + b"commit" + device_public_key + nonce).digest()


def short_auth_string(key_a: bytes, nonce_a: bytes, key_b: bytes, nonce_b: bytes) -> str:
    """The 6 digits both screens show: the same on both sides, whichever side is "a"."""
    first, second = sorted([(key_a, nonce_a), (key_b, nonce_b)])
    digest = hashlib.sha256(_CONTEXT + first[0] + first[1] + second[0] + second[1]).digest()
    return f"{int.from_bytes(digest[:8], 'big') % 1_000_000:06d}"
