"""The model registry: every accepted global adapter is a signed, content-addressed version.

Layout under the aggregator's home::

    registry/signing.key     Ed25519 private key
    registry/signing.pub     its public key (raw 32 bytes, base64) - pods pin it
    registry/versions/ID.npz the adapter bytes
    registry/versions/ID.json  the version record (below) and its signature
    registry/current         the id of the active version

Every file is 0600 and every folder 0700, the public key too (the operator hands pods a
copy): a version's adapter is a DP release, but the operator decides whom to show it to.

Versions are :class:`covey.protocols.ModelVersion` records, signed as that protocol says.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from covey._files import write_atomic
from covey.errors import InvalidInputError
from covey.protocols import ModelVersion, verify_version

__all__ = ["Registry"]


class Registry:
    """Versions of the global adapter in an aggregator home."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.versions_dir = folder / "versions"
        key_path = folder / "signing.key"
        if key_path.exists():
            self._key = Ed25519PrivateKey.from_private_bytes(
                base64.b64decode(key_path.read_text().strip()))
        else:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._key = Ed25519PrivateKey.generate()
            write_atomic(key_path, base64.b64encode(self._key.private_bytes_raw()) + b"\n")
            write_atomic(folder / "signing.pub", base64.b64encode(self.public_key) + b"\n")
        self.versions_dir.mkdir(mode=0o700, exist_ok=True)

    @property
    def public_key(self) -> bytes:
        """The raw Ed25519 public key pods verify against."""
        return self._key.public_key().public_bytes_raw()

    @property
    def public_key_path(self) -> Path:
        """Where the public key is published for pods."""
        return self.folder / "signing.pub"

    def add(self, adapter_bytes: bytes, *, parent: str | None, round: int, run_id: str,
            metrics: dict[str, float], epsilon: float) -> tuple[ModelVersion, bytes]:
        """Register and sign a new version; returns it with its signature."""
        version = ModelVersion(
            id=f"v{round:04d}-{secrets.token_hex(4)}", parent=parent, round=round,
            run_id=run_id, sha256=hashlib.sha256(adapter_bytes).hexdigest(),
            metrics=metrics, epsilon=epsilon,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"))
        signature = self._key.sign(version.canonical())
        write_atomic(self.versions_dir / f"{version.id}.npz", adapter_bytes)
        record = {**asdict(version), "signature": base64.b64encode(signature).decode()}
        write_atomic(self.versions_dir / f"{version.id}.json",
                     (json.dumps(record, indent=2) + "\n").encode())
        return version, signature

    def get(self, version_id: str) -> tuple[ModelVersion, bytes, bytes]:
        """A version, its adapter bytes and its signature, verified.

        Raises:
            InvalidInputError: no such version.
            SignatureError: the stored files do not verify.
        """
        path = self.versions_dir / f"{version_id}.json"
        if "/" in version_id or not path.exists():
            raise InvalidInputError(f"no model version {version_id!r} in {self.folder}")
        record = json.loads(path.read_text())
        version = ModelVersion.from_dict(record)
        signature = base64.b64decode(record.get("signature", ""))
        data = (self.versions_dir / f"{version_id}.npz").read_bytes()
        verify_version(version, data, signature, self.public_key)
        return version, data, signature

    def versions(self) -> list[ModelVersion]:
        """Every version, oldest first."""
        out = [ModelVersion.from_dict(json.loads(p.read_text()))
               for p in self.versions_dir.glob("*.json")]
        return sorted(out, key=lambda v: (v.created_at, v.round, v.id))

    @property
    def current_id(self) -> str | None:
        """The active version's id (None before the first)."""
        path = self.folder / "current"
        return path.read_text().strip() if path.exists() else None

    def activate(self, version_id: str) -> ModelVersion:
        """Make ``version_id`` the active version (the rollback by hand)."""
        version, _, _ = self.get(version_id)
        write_atomic(self.folder / "current", version_id.encode() + b"\n")
        return version

    def sign_round(self, settings: dict[str, Any]) -> bytes:
        """Sign a round's settings (see :mod:`covey.protocols._round`)."""
        from covey.protocols import round_bytes

        return self._key.sign(round_bytes(settings))

    def sign_app(self, fab: bytes) -> dict[str, str | int]:
        """Sign a Flower app bundle as Flower's trusted-entities check expects it.

        Returns the verification record the app hub hands the SuperLink: the key's id,
        the base64url Ed25519 signature over ``signed_at`` and the FAB's SHA-256, and
        ``signed_at`` (seconds since the epoch).
        """
        from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign

        from covey.protocols import app_key_id

        signed_at = int(datetime.now(UTC).timestamp())
        message = create_message_to_sign(hashlib.sha256(fab).digest(), signed_at)
        signature = base64.urlsafe_b64encode(self._key.sign(message)).rstrip(b"=").decode()
        return {"public_key_id": app_key_id(self.public_key), "signature": signature,
                "signed_at": signed_at}
