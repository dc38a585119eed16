"""A device's key for joining a federation: SuperNode authentication on Flower 1.42.

Flower authenticates SuperNodes by an EC key on a NIST curve, given to the SuperNode as
an OpenSSH private key file; the aggregator registers the public key (one OpenSSH line)
before the node may connect.
"""

from __future__ import annotations

from pathlib import Path

from covey._files import write_atomic

__all__ = ["make_node_key"]


def make_node_key(private_path: Path) -> Path:
    """An EC P-384 key pair in OpenSSH format for SuperNode authentication; returns the
    public key's path (``<private>.pub``)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    write_atomic(private_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    public = private_path.with_name(private_path.name + ".pub")
    write_atomic(public, key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n", mode=0o644)
    return public
