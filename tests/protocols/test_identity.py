"""The user key certifies and revokes devices; both screens show the same SAS."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from covey.protocols._identity import (
    DeviceCertificate,
    Revocation,
    UserKey,
    commitment,
    short_auth_string,
)


def _device() -> bytes:
    return Ed25519PrivateKey.generate().public_key().public_bytes_raw()


def test_a_certificate_verifies_only_for_its_user_and_content() -> None:
    user, stranger = UserKey.generate(), UserKey.generate()
    cert = user.certify("dev-phone", _device(), "phone")
    cert.verify(user.public_key)
    assert DeviceCertificate.from_dict(cert.to_dict()) == cert
    with pytest.raises(ValueError, match="another user"):
        cert.verify(stranger.public_key)
    for forged in (replace(cert, device_public_key=DeviceCertificate.from_dict(
            user.certify("x", _device(), "x").to_dict()).device_public_key),
                   replace(cert, name="laptop"), replace(cert, signature="AAAA")):
        with pytest.raises(ValueError, match="not signed"):
            forged.verify(user.public_key)
    # a stranger cannot certify a device into this user's list
    theirs = stranger.certify("dev-evil", _device(), "evil")
    with pytest.raises(ValueError):
        replace(theirs, user_id=user.user_id).verify(user.public_key)


def test_revocations_are_signed_by_the_user_key() -> None:
    user = UserKey.generate()
    rev = user.revoke("dev-old", "lost")
    rev.verify(user.public_key)
    assert Revocation.from_dict(rev.to_dict()) == rev
    with pytest.raises(ValueError):
        replace(rev, device_id="dev-phone").verify(user.public_key)
    copy = UserKey.from_bytes(user.private_bytes())
    assert copy.user_id == user.user_id and copy.public_key == user.public_key


def test_both_sides_compute_the_same_six_digits_and_a_different_nonce_changes_them() -> None:
    a, b = _device(), _device()
    na, nb = os.urandom(16), os.urandom(16)
    sas = short_auth_string(a, na, b, nb)
    assert sas == short_auth_string(b, nb, a, na)
    assert len(sas) == 6 and sas.isdigit()
    others = {short_auth_string(a, na, b, os.urandom(16)) for _ in range(50)}
    assert len(others) > 45  # fresh nonces give fresh strings
    assert commitment(a, na) != commitment(a, nb) and len(commitment(a, na)) == 32
