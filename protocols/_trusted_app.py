"""Which code a pod's SuperNode runs: the aggregator's key as Flower's trusted entity.

A Flower 1.42 SuperNode started with ``--trusted-entities FILE`` runs a Flower app
(FAB) only when the app's verification record carries an Ed25519 signature, by a key
listed in FILE, over ``signed_at`` (8 bytes, big-endian) followed by the FAB's SHA-256
(``flwr/supernode/start_client_internal.py``: ``_verify_fab``); any other app gets an
error reply and never starts. covey's aggregator signs its own app with the key that
signs model versions; a pod pins that key when it joins and lists it as its one trusted
entity. The two signed messages cannot be taken for one another: an app signature
covers exactly 40 bytes, a model version's canonical JSON is longer and begins with
``{``.
"""

from __future__ import annotations

import hashlib
import uuid

__all__ = ["app_key_id", "trusted_entities"]


def app_key_id(public_key: bytes) -> str:
    """The id Flower files a trusted key under (``fpk_`` and a UUID), derived from it."""
    digest = hashlib.sha256(b"covey app signer\x00" + public_key).digest()
    return f"fpk_{uuid.UUID(bytes=digest[:16])}"


def trusted_entities(public_key: bytes) -> str:
    """The YAML a SuperNode's ``--trusted-entities`` reads: this raw Ed25519 key alone.

    Raises:
        ValueError: not a 32-byte Ed25519 public key.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    openssh = Ed25519PublicKey.from_public_bytes(public_key).public_bytes(
        Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
    return f"{app_key_id(public_key)}: '{openssh} covey-aggregator'\n"
