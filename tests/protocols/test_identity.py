"""The user key certifies and revokes devices; revoking replaces the user key while the
user id stays; both devices derive the same pairing codes."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from covey.protocols._identity import (
    DeviceCertificate,
    Revocation,
    UserKey,
    b64,
    commitment,
    device_id_of,
    pairing_codes,
    user_id_of,
)


def _device() -> bytes:
    return Ed25519PrivateKey.generate().public_key().public_bytes_raw()


def test_a_certificate_verifies_only_for_its_content_and_signer() -> None:
    first = _device()
    user, stranger = UserKey.generate_for(first), UserKey.generate_for(_device())
    assert user.user_id == user_id_of(user.public_key, first)
    cert = user.certify(_device(), "phone")
    assert cert.verify() == user.public_key
    assert cert.device_id == device_id_of(cert.device_key)
    assert DeviceCertificate.from_dict(cert.to_dict()) == cert
    for forged in (replace(cert, device_public_key=b64(_device())), replace(cert, name="laptop"),
                   replace(cert, signature=b64(bytes(64))), replace(cert, user_id="0" * 32),
                   replace(cert, signer=b64(stranger.public_key))):
        with pytest.raises(ValueError):
            forged.verify()
    with pytest.raises(ValueError):  # a statement carries exactly its fields, as strings
        DeviceCertificate.from_dict({**cert.to_dict(), "extra": "x"})
    with pytest.raises(ValueError):
        DeviceCertificate.from_dict({**cert.to_dict(), "name": 7})


def test_revoking_replaces_the_user_key_and_keeps_the_user_id() -> None:
    user = UserKey.generate_for(_device())
    revocation, successor = user.revoke("dev-old", "lost", kept="")
    assert revocation.verify() == user.public_key  # signed by the key it retires
    assert revocation.next_key == b64(successor.public_key) != revocation.previous_key
    assert successor.user_id == user.user_id  # the identity other parts key on stays
    assert Revocation.from_dict(revocation.to_dict()) == revocation
    with pytest.raises(ValueError):
        replace(revocation, device_id="dev-phone").verify()
    with pytest.raises(ValueError):  # a successor cannot be slipped in afterwards
        replace(revocation, next_key=b64(_device())).verify()
    copy = UserKey.from_bytes(successor.private_bytes(), successor.user_id)
    assert copy.public_key == successor.public_key


def test_both_sides_derive_the_same_codes_in_opposite_roles() -> None:
    a, b = _device(), _device()
    na, nb = os.urandom(16), os.urandom(16)
    shown_a, typed_a = pairing_codes(a, na, b, nb)
    shown_b, typed_b = pairing_codes(b, nb, a, na)
    assert (shown_a, typed_a) == (typed_b, shown_b)  # each types what the other shows
    assert all(len(c) == 6 and c.isdigit() for c in (shown_a, typed_a))
    others = {pairing_codes(a, na, b, os.urandom(16))[1] for _ in range(50)}
    assert len(others) > 45  # fresh nonces give fresh codes
    assert commitment(a, na, b"x") != commitment(a, na, b"y")  # claims are committed to
    assert len(commitment(a, na)) == 32
