"""Pod lifecycle: create, unlock, wrong passphrase, corruption, tampering, shredding."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from covey.device import Pod
from covey.errors import (
    PodExistsError,
    PodForgottenError,
    PodNotFoundError,
    StoreCorruptError,
    WrongPassphraseError,
)
from tests.conftest import FAST_CONFIG, PASSPHRASE


def _digest_tree(home: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(home.rglob("*")) if p.is_file()}


def test_create_and_reopen(home: Path) -> None:
    with Pod.create(home, PASSPHRASE, name="phone", config=FAST_CONFIG) as pod:
        device_id, pod_id = pod.identity.device_id, pod.pod_id
        pod.memories.add("remember me")
    assert (home / "pod.key").stat().st_mode & 0o777 == 0o600
    assert home.stat().st_mode & 0o777 == 0o700
    with Pod.open(home, PASSPHRASE, config=FAST_CONFIG) as pod:
        assert (pod.identity.device_id, pod.pod_id, pod.name) == (device_id, pod_id, "phone")
        assert [m.text for m in pod.memories.all()] == ["remember me"]
        signature = pod.identity.sign(b"x")
        assert len(signature) == 64


def test_create_refuses_existing(pod: Pod) -> None:
    with pytest.raises(PodExistsError):
        Pod.create(pod.home, PASSPHRASE, config=FAST_CONFIG)


def test_open_missing(home: Path) -> None:
    with pytest.raises(PodNotFoundError):
        Pod.open(home, PASSPHRASE)


def test_wrong_passphrase_changes_nothing(pod: Pod) -> None:
    pod.memories.add("still here")
    pod.close()
    before = _digest_tree(pod.home)
    for attempt in ("wrong", "", PASSPHRASE + " ", PASSPHRASE.upper()):
        with pytest.raises(WrongPassphraseError):
            Pod.open(pod.home, attempt)
        with pytest.raises(WrongPassphraseError):
            Pod.change_passphrase(pod.home, attempt, "a new passphrase", config=FAST_CONFIG)
    assert _digest_tree(pod.home) == before
    with Pod.open(pod.home, PASSPHRASE) as again:
        assert again.memories.count() == 1


def test_truncated_database(pod: Pod) -> None:
    for i in range(200):
        pod.memories.add(f"memory number {i} " + "padding " * 20)
    pod.close()
    db = pod.home / "pod.db"
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2])
    truncated = db.read_bytes()
    with pytest.raises(StoreCorruptError) as err, Pod.open(pod.home, PASSPHRASE) as broken:
        broken.memories.all()
        assert broken.store.integrity_errors() == []  # must not get here
    assert "pod.db" in str(err.value)
    assert db.read_bytes() == truncated  # the evidence is left as it was


def test_corrupted_page(pod: Pod) -> None:
    for i in range(50):
        pod.memories.add(f"memory {i} " + "x" * 200)
    pod.close()
    db = pod.home / "pod.db"
    data = bytearray(db.read_bytes())
    data[4096 * 2 + 100] ^= 0xFF  # flip a byte inside the third page
    db.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError), Pod.open(pod.home, PASSPHRASE) as broken:
        broken.memories.all()
        problems = broken.store.integrity_errors()
        raise StoreCorruptError(db, "; ".join(problems)) if problems else AssertionError


def test_garbage_header(pod: Pod) -> None:
    pod.close()
    db = pod.home / "pod.db"
    db.write_bytes(b"\0" * 100 + db.read_bytes()[100:])
    with pytest.raises(StoreCorruptError, match=r"pod\.db"):
        Pod.open(pod.home, PASSPHRASE)


def test_database_missing(pod: Pod) -> None:
    pod.close()
    (pod.home / "pod.db").unlink()
    with pytest.raises(StoreCorruptError, match="missing"):
        Pod.open(pod.home, PASSPHRASE)


def _tamper(pod: Pod, sql: str) -> None:
    c = pod.store.conn
    c.execute("DROP TRIGGER audit_log_no_update")
    c.execute("DROP TRIGGER audit_log_no_delete")
    c.execute(sql)


def test_audit_log_is_append_only(pod: Pod) -> None:
    pod.audit("egress", peer="aggregator", nbytes=1000, epsilon=0.5)
    with pytest.raises(Exception, match="append-only"):
        pod.store.conn.execute("UPDATE audit_log SET bytes = 1 WHERE seq = 2")
    with pytest.raises(Exception, match="append-only"):
        pod.store.conn.execute("DELETE FROM audit_log")


def test_tampered_audit_row_detected(pod: Pod) -> None:
    for i in range(5):
        pod.audit("egress", peer="aggregator", nbytes=100 * i, epsilon=0.1)
    assert pod.verify_audit_chain().ok
    _tamper(pod, "UPDATE audit_log SET epsilon = 0.0 WHERE seq = 3")
    check = pod.verify_audit_chain()
    assert (check.ok, check.bad_seq) == (False, 3)
    assert "hash" in check.reason


def test_removed_audit_row_detected(pod: Pod) -> None:
    for _ in range(4):
        pod.audit("egress", nbytes=10)
    _tamper(pod, "DELETE FROM audit_log WHERE seq = 2")
    assert pod.verify_audit_chain().bad_seq == 2


def test_dropped_audit_tail_detected(pod: Pod) -> None:
    for _ in range(4):
        pod.audit("egress", nbytes=10)
    _tamper(pod, "DELETE FROM audit_log WHERE seq = 5")
    check = pod.verify_audit_chain()
    assert not check.ok and "removed" in check.reason


def test_status_reports_tampering_through_cli(pod: Pod, covey, tmp_path: Path) -> None:
    pod.audit("egress", nbytes=10)
    _tamper(pod, "UPDATE audit_log SET peer = 'someone else' WHERE seq = 2")
    pod.close()
    result = covey("pod", "status", "--home", str(pod.home), "--json")
    assert result.returncode == 8
    assert json.loads(result.stdout)["audit_chain"]["bad_seq"] == 2
    assert result.stderr.strip() == (
        "error: audit log broken at entry 2: content does not match its hash")


def test_forget_all(pod: Pod) -> None:
    pod.memories.add("to be shredded")
    pod.close()
    removed = Pod.forget(pod.home)
    assert "pod.key" in removed and "pod.db" in removed
    assert [p.name for p in pod.home.iterdir()] == ["FORGOTTEN"]
    with pytest.raises(PodForgottenError, match="data key was destroyed"):
        Pod.open(pod.home, PASSPHRASE)
    with pytest.raises(PodExistsError):
        Pod.create(pod.home, PASSPHRASE)
    assert Pod.forget(pod.home) == []  # idempotent


def test_forget_resumes_after_interruption(pod: Pod) -> None:
    pod.close()
    # As if the process died after writing the tombstone and shredding the key.
    (pod.home / "FORGOTTEN").write_text("2026-01-01\n")
    (pod.home / "pod.key").unlink()
    assert "pod.db" in Pod.forget(pod.home)
    assert [p.name for p in pod.home.iterdir()] == ["FORGOTTEN"]


def test_wrong_passphrase_copy_elsewhere(pod: Pod, tmp_path: Path) -> None:
    """A copied pod is as locked as the original: the key file alone is useless."""
    pod.close()
    copy = tmp_path / "copy"
    shutil.copytree(pod.home, copy)
    with pytest.raises(WrongPassphraseError):
        Pod.open(copy, "guess guess guess")
    with Pod.open(copy, PASSPHRASE) as twin:
        assert twin.pod_id
