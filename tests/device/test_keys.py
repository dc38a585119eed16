"""Data-key wrapping: Argon2id + AES-256-GCM, recorded parameters, wrong passphrases."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from covey.device import KdfParams
from covey.device.store._keys import WrappedKey, new_data_key, unwrap, wrap
from covey.errors import StoreCorruptError, WrongPassphraseError

FAST = KdfParams(1, 8192, 1)


def test_round_trip_and_fresh_salt() -> None:
    key = new_data_key()
    assert len(key) == 32
    a, b = wrap(key, "passphrase one", FAST), wrap(key, "passphrase one", FAST)
    assert a.salt != b.salt and a.ciphertext != b.ciphertext
    assert unwrap(a, "passphrase one") == key == unwrap(b, "passphrase one")


def test_wrong_passphrase() -> None:
    wrapped = wrap(new_data_key(), "right passphrase", FAST)
    with pytest.raises(WrongPassphraseError):
        unwrap(wrapped, "wrong passphrase")


def test_parameters_recorded(tmp_path: Path) -> None:
    params = KdfParams(2, 16384, 2)
    wrapped = wrap(new_data_key(), "pw pw pw pw", params)
    path = tmp_path / "pod.key"
    path.write_text(wrapped.to_json())
    doc = json.loads(path.read_text())
    assert doc["kdf"] == {"name": "argon2id", "version": 19, "time_cost": 2,
                          "memory_kib": 16384, "parallelism": 2}
    assert doc["cipher"] == "AES-256-GCM"
    assert WrappedKey.from_file(path) == wrapped


def test_tampered_key_file(tmp_path: Path) -> None:
    wrapped = wrap(new_data_key(), "pw pw pw pw", FAST)
    doc = json.loads(wrapped.to_json())
    salt = bytearray(base64.b64decode(doc["salt"]))
    salt[0] ^= 1
    doc["salt"] = base64.b64encode(bytes(salt)).decode()
    path = tmp_path / "pod.key"
    path.write_text(json.dumps(doc))
    with pytest.raises(WrongPassphraseError):
        unwrap(WrappedKey.from_file(path), "pw pw pw pw")
    path.write_text(wrapped.to_json()[:40])
    with pytest.raises(StoreCorruptError, match="unreadable key file"):
        WrappedKey.from_file(path)


@pytest.mark.parametrize("bad", [(0, 8192, 1), (1, 512, 1), (1, 8192, 0)])
def test_invalid_params(bad: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError):
        KdfParams(*bad)
