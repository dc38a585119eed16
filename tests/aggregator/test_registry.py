"""Signed model versions: verification, tampering, rollback."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from covey.aggregator._registry import Registry
from covey.errors import InvalidInputError
from covey.protocols import ModelVersion, SignatureError, verify_version


def test_versions_are_signed_and_verify(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    version, signature = registry.add(b"adapter-bytes", parent=None, round=0, run_id="r",
                                      metrics={"perplexity": 100.0}, epsilon=0.0)
    public = base64.b64decode((tmp_path / "registry" / "signing.pub").read_text())
    verify_version(version, b"adapter-bytes", signature, public)
    with pytest.raises(SignatureError, match="signed hash"):
        verify_version(version, b"adapter-bytez", signature, public)
    forged = ModelVersion(**{**version.__dict__, "epsilon": 0.1})
    with pytest.raises(SignatureError, match="bad signature"):
        verify_version(forged, b"adapter-bytes", signature, public)
    other = Registry(tmp_path / "other")
    with pytest.raises(SignatureError):
        verify_version(version, b"adapter-bytes", signature, other.public_key)
    # reopening keeps the same key
    assert Registry(tmp_path / "registry").public_key == public
    assert (tmp_path / "registry" / "signing.key").stat().st_mode & 0o777 == 0o600


def test_tampered_stored_version_is_refused(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    v, _ = registry.add(b"x" * 10, parent=None, round=1, run_id="r", metrics={}, epsilon=1.0)
    (tmp_path / "versions" / f"{v.id}.npz").write_bytes(b"y" * 10)
    with pytest.raises(SignatureError):
        registry.get(v.id)
    with pytest.raises(SignatureError):
        registry.activate(v.id)
    record = json.loads((tmp_path / "versions" / f"{v.id}.json").read_text())
    assert record["sha256"] == v.sha256


def test_rollback_by_hand(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    a, _ = registry.add(b"a", parent=None, round=0, run_id="r", metrics={}, epsilon=0.0)
    b, _ = registry.add(b"b", parent=a.id, round=1, run_id="r", metrics={}, epsilon=1.0)
    registry.activate(b.id)
    assert registry.current_id == b.id
    registry.activate(a.id)
    assert registry.current_id == a.id
    assert [v.id for v in registry.versions()] == [a.id, b.id]
    with pytest.raises(InvalidInputError, match="no model version"):
        registry.activate("v9999-nope")
