"""The signed model version: what an aggregator publishes and a pod verifies.

A version record is ``{id, parent, round, run_id, sha256, metrics, epsilon, created_at}``.
The signature is Ed25519 over the record's canonical JSON (sorted keys, no spaces), and
the record names the SHA-256 of the adapter bytes, so a pod that verifies the signature
and the hash knows the adapter came unchanged from the aggregator whose key it pinned.
Version 1 of this format.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from covey.errors import CoveyError

__all__ = ["ModelVersion", "SignatureError", "verify_version"]


class SignatureError(CoveyError):
    """A model version's signature or hash does not verify."""

    exit_code = 6


@dataclass(frozen=True)
class ModelVersion:
    """One registered global adapter (its bytes live next to the record)."""

    id: str
    parent: str | None
    round: int
    run_id: str
    sha256: str
    metrics: dict[str, float] = field(default_factory=dict)
    epsilon: float = 0.0
    created_at: str = ""

    def canonical(self) -> bytes:
        """The bytes that are signed."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelVersion:
        """Parse a record (raises ValueError on a malformed one)."""
        try:
            return cls(id=str(data["id"]), parent=data.get("parent"), round=int(data["round"]),
                       run_id=str(data["run_id"]), sha256=str(data["sha256"]),
                       metrics={k: float(v) for k, v in dict(data.get("metrics", {})).items()},
                       epsilon=float(data.get("epsilon", 0.0)),
                       created_at=str(data.get("created_at", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed model version record: {exc}") from None


def verify_version(version: ModelVersion, adapter_bytes: bytes, signature: bytes,
                   public_key: bytes) -> None:
    """Check the signature over ``version`` and that ``adapter_bytes`` match its hash.

    Raises:
        SignatureError: either check fails.
    """
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, version.canonical())
    except (InvalidSignature, ValueError):
        raise SignatureError(f"model version {version.id} has a bad signature") from None
    if hashlib.sha256(adapter_bytes).hexdigest() != version.sha256:
        raise SignatureError(f"model version {version.id} does not match its signed hash")
