"""Key management: the pod's data key, its passphrase wrapping, and the device identity.

A pod has one random 256-bit data key (DEK). SQLCipher is keyed with it directly (raw
key, no second KDF). The DEK is stored only wrapped: AES-256-GCM under a key-encryption
key derived from the passphrase with Argon2id. The KDF parameters and salt are stored
beside the wrapped key, so a pod created with stronger parameters keeps them.
Changing the passphrase rewraps the DEK; the store itself is not touched.

The device's Ed25519 private key is wrapped in the same file under the same
key-encryption key (its own nonce and associated data), not kept in the store: whoever
holds only the data key can read and rewrite the store but cannot sign as the device,
so the ledger's and the audit log's signed chain heads (kept outside the store) show
such a rewrite. The key file also says (bound into the data key's associated data) that
the pod keeps a signed audit head, so that the mark cannot be taken out to make the pod
adopt a rewritten audit chain as a pod from before the signed head does once.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from argon2.low_level import Type, hash_secret_raw
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from covey._files import fsync_dir, write_atomic
from covey.errors import StoreCorruptError, WrongPassphraseError

__all__ = [
    "DATA_KEY_BYTES", "KdfParams", "WrappedKey", "fsync_dir", "new_data_key", "shred", "unwrap",
    "unwrap_keys", "wrap", "write_atomic",
]

DATA_KEY_BYTES = 32
_SALT_BYTES = 16
_NONCE_BYTES = 12
_FORMAT = "covey-keyring-1"
# Binds the ciphertext to its purpose, so a wrapped key cannot be replayed as another.
_AAD = b"covey pod data key v1"
_DEVICE_AAD = b"covey pod device key v1"
# A key file that holds the device key wraps the data key with this instead: removing the
# device key from the file (to make the pod take one from the store) breaks the unwrap.
_AAD_WITH_DEVICE = b"covey pod data key v1; the device key beside it"
# A key file of a pod that keeps a signed audit-chain head (audit.head) says so, bound the
# same way: taking the mark out, so that the pod would sign a rewritten chain afresh as a
# pod from before the signed head does once, breaks the unwrap.
_AAD_WITH_AUDIT_HEAD = b"covey pod data key v1; the device key beside it; audit head signed"


@dataclass(frozen=True)
class KdfParams:
    """Argon2id parameters.

    The defaults (t=3, 64 MiB, 2 lanes) are RFC 9106's second recommended option with
    two lanes for a two-core device; they unlock in about 0.13 s on the reference
    machine (see ``make bench``).
    """

    time_cost: int = 3
    memory_kib: int = 65536
    parallelism: int = 2

    def __post_init__(self) -> None:
        if not 1 <= self.time_cost <= 64:
            raise ValueError(f"kdf time_cost must be in 1..64, got {self.time_cost}")
        if not 1024 <= self.memory_kib <= 4 * 1024 * 1024:
            raise ValueError(f"kdf memory_kib must be in 1024..4194304, got {self.memory_kib}")
        if not 1 <= self.parallelism <= 16:
            raise ValueError(f"kdf parallelism must be in 1..16, got {self.parallelism}")


def new_data_key() -> bytes:
    """A fresh random 256-bit data key."""
    return secrets.token_bytes(DATA_KEY_BYTES)


def _derive(passphrase: str, salt: bytes, params: KdfParams) -> bytes:
    return hash_secret_raw(
        secret=passphrase.encode("utf-8"),
        salt=salt,
        time_cost=params.time_cost,
        memory_cost=params.memory_kib,
        parallelism=params.parallelism,
        hash_len=DATA_KEY_BYTES,
        type=Type.ID,
    )


@dataclass(frozen=True)
class WrappedKey:
    """The data key encrypted under a passphrase-derived key, with how to derive it."""

    kdf: KdfParams
    salt: bytes
    nonce: bytes
    ciphertext: bytes
    created_at: str
    device_nonce: bytes = b""  # empty in key files written before the device key moved here
    device_ciphertext: bytes = b""
    audit_head: bool = False  # the pod keeps a signed audit head (False: made before it)

    def _data_aad(self) -> bytes:
        if not self.device_ciphertext:
            return _AAD
        return _AAD_WITH_AUDIT_HEAD if self.audit_head else _AAD_WITH_DEVICE

    def to_json(self) -> str:
        """Serialize for the key file."""
        doc: dict[str, Any] = {
            "format": _FORMAT,
            "kdf": {"name": "argon2id", "version": 19, **asdict(self.kdf)},
            "salt": base64.b64encode(self.salt).decode(),
            "cipher": "AES-256-GCM",
            "nonce": base64.b64encode(self.nonce).decode(),
            "ciphertext": base64.b64encode(self.ciphertext).decode(),
            "created_at": self.created_at,
        }
        if self.device_ciphertext:
            doc["device_key"] = {"nonce": base64.b64encode(self.device_nonce).decode(),
                                 "ciphertext": base64.b64encode(self.device_ciphertext).decode()}
        if self.audit_head:
            doc["audit_head"] = True
        return json.dumps(doc, indent=2) + "\n"

    @classmethod
    def from_file(cls, path: Path) -> WrappedKey:
        """Read a key file.

        Raises:
            StoreCorruptError: the file is not a complete, well-formed key file.
        """
        try:
            doc = json.loads(path.read_bytes())
            if doc.get("format") != _FORMAT:
                raise ValueError("unknown format")
            kdf = doc["kdf"]
            if kdf.get("name") != "argon2id":
                raise ValueError("unknown kdf")
            device = doc.get("device_key") or {"nonce": "", "ciphertext": ""}
            return cls(
                kdf=KdfParams(kdf["time_cost"], kdf["memory_kib"], kdf["parallelism"]),
                salt=base64.b64decode(doc["salt"], validate=True),
                nonce=base64.b64decode(doc["nonce"], validate=True),
                ciphertext=base64.b64decode(doc["ciphertext"], validate=True),
                created_at=str(doc["created_at"]),
                device_nonce=base64.b64decode(device["nonce"], validate=True),
                device_ciphertext=base64.b64decode(device["ciphertext"], validate=True),
                audit_head=doc.get("audit_head") is True,
            )
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise StoreCorruptError(path, f"unreadable key file: {type(exc).__name__}") from None


def wrap(data_key: bytes, passphrase: str, params: KdfParams, device_key: bytes = b"",
         *, audit_head: bool = False) -> WrappedKey:
    """Encrypt ``data_key`` (and the device's private key, if given) under a fresh
    Argon2id derivation of ``passphrase``; ``audit_head`` marks a pod that keeps a signed
    audit-chain head (it needs the device key)."""
    if audit_head and not device_key:
        raise ValueError("only a key file with the device key can mark a signed audit head")
    salt = secrets.token_bytes(_SALT_BYTES)
    nonce = secrets.token_bytes(_NONCE_BYTES)
    kek = AESGCM(_derive(passphrase, salt, params))
    device_nonce = secrets.token_bytes(_NONCE_BYTES) if device_key else b""
    device_ciphertext = kek.encrypt(device_nonce, device_key, _DEVICE_AAD) if device_key else b""
    now = datetime.now(UTC).isoformat(timespec="seconds")
    shell = WrappedKey(params, salt, nonce, b"", now, device_nonce, device_ciphertext,
                       audit_head)
    return replace(shell, ciphertext=kek.encrypt(nonce, data_key, shell._data_aad()))


def unwrap_keys(wrapped: WrappedKey, passphrase: str) -> tuple[bytes, bytes]:
    """Recover the data key and the device's private key (empty in an older key file).

    Raises:
        WrongPassphraseError: the derived key does not authenticate either ciphertext.
    """
    kek = AESGCM(_derive(passphrase, wrapped.salt, wrapped.kdf))
    try:
        data_key = kek.decrypt(wrapped.nonce, wrapped.ciphertext, wrapped._data_aad())
        device_key = (kek.decrypt(wrapped.device_nonce, wrapped.device_ciphertext, _DEVICE_AAD)
                      if wrapped.device_ciphertext else b"")
    except InvalidTag:
        raise WrongPassphraseError() from None
    if len(data_key) != DATA_KEY_BYTES:
        raise WrongPassphraseError()
    return data_key, device_key


def unwrap(wrapped: WrappedKey, passphrase: str) -> bytes:
    """Recover the data key.

    Raises:
        WrongPassphraseError: the derived key does not authenticate the ciphertext.
    """
    return unwrap_keys(wrapped, passphrase)[0]


def shred(path: Path) -> None:
    """Overwrite a small file with random bytes, sync, and remove it."""
    if not path.exists():
        return
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.write(secrets.token_bytes(max(size, 1)))
        f.flush()
        os.fsync(f.fileno())
    path.unlink()
    fsync_dir(path.parent)
