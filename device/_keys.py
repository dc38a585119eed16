"""Key management: the pod's data key, its passphrase wrapping, and the device identity.

A pod has one random 256-bit data key (DEK). SQLCipher is keyed with it directly (raw
key, no second KDF). The DEK is stored only wrapped: AES-256-GCM under a key-encryption
key derived from the passphrase with Argon2id. The KDF parameters and salt are stored
beside the wrapped key, so a pod created with stronger parameters keeps them.
Changing the passphrase rewraps the DEK; the store itself is not touched.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from dataclasses import asdict, dataclass
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
    "wrap", "write_atomic",
]

DATA_KEY_BYTES = 32
_SALT_BYTES = 16
_NONCE_BYTES = 12
_FORMAT = "covey-keyring-1"
# Binds the ciphertext to its purpose, so a wrapped key cannot be replayed as another.
_AAD = b"covey pod data key v1"


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
            return cls(
                kdf=KdfParams(kdf["time_cost"], kdf["memory_kib"], kdf["parallelism"]),
                salt=base64.b64decode(doc["salt"], validate=True),
                nonce=base64.b64decode(doc["nonce"], validate=True),
                ciphertext=base64.b64decode(doc["ciphertext"], validate=True),
                created_at=str(doc["created_at"]),
            )
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise StoreCorruptError(path, f"unreadable key file: {type(exc).__name__}") from None


def wrap(data_key: bytes, passphrase: str, params: KdfParams) -> WrappedKey:
    """Encrypt ``data_key`` under a fresh Argon2id derivation of ``passphrase``."""
    salt = secrets.token_bytes(_SALT_BYTES)
    nonce = secrets.token_bytes(_NONCE_BYTES)
    kek = _derive(passphrase, salt, params)
    ciphertext = AESGCM(kek).encrypt(nonce, data_key, _AAD)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    return WrappedKey(params, salt, nonce, ciphertext, now)


def unwrap(wrapped: WrappedKey, passphrase: str) -> bytes:
    """Recover the data key.

    Raises:
        WrongPassphraseError: the derived key does not authenticate the ciphertext.
    """
    kek = _derive(passphrase, wrapped.salt, wrapped.kdf)
    try:
        data_key = AESGCM(kek).decrypt(wrapped.nonce, wrapped.ciphertext, _AAD)
    except InvalidTag:
        raise WrongPassphraseError() from None
    if len(data_key) != DATA_KEY_BYTES:
        raise WrongPassphraseError()
    return data_key


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
