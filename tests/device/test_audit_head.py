"""The audit log's chain head is signed by the device key and kept outside the store
(`audit.head`), so whoever holds only the data key can neither cut the egress record's
tail nor rewrite an entry, even recomputing every hash and the head the store used to
keep, without `covey pod status` saying the log is broken."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import sqlcipher3.dbapi2 as sqlite

from covey.device import Pod
from covey.device.store._audit import _digest
from covey.device.store._keys import WrappedKey, unwrap, unwrap_keys, wrap
from covey.errors import WrongPassphraseError
from tests.conftest import FAST_CONFIG, PASSPHRASE

_COLUMNS = "seq, created_at, kind, peer, bytes, epsilon, detail, prev_hash, hash"


def _pod_with_egress(home: Path, n: int = 5) -> None:
    with Pod.create(home, PASSPHRASE, config=FAST_CONFIG) as pod:
        for i in range(n):
            pod.audit("federated_update", peer="aggregator", nbytes=1000 + i, epsilon=0.5)


def _as_attacker(home: Path) -> sqlite.Connection:
    """The store opened with the data key alone (not the device key), triggers dropped."""
    data_key = unwrap(WrappedKey.from_file(home / "pod.key"), PASSPHRASE)
    conn = sqlite.connect(str(home / "pod.db"))
    conn.execute(f"PRAGMA key = \"x'{data_key.hex()}'\"")
    conn.execute("DROP TRIGGER IF EXISTS audit_log_no_update")
    conn.execute("DROP TRIGGER IF EXISTS audit_log_no_delete")
    return conn


def _set_store_head(conn: sqlite.Connection) -> None:
    """Make the head the store kept (before the signed head) match the rewritten chain."""
    seq, digest = conn.execute("SELECT seq, hash FROM audit_log ORDER BY seq DESC"
                               " LIMIT 1").fetchone()
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('audit_head', ?)",
                 (f"{seq}:{digest}",))


def _cut_tail(home: Path, keep: int) -> None:
    conn = _as_attacker(home)
    conn.execute("DELETE FROM audit_log WHERE seq > ?", (keep,))
    _set_store_head(conn)
    conn.commit()
    conn.close()


def _rewrite(home: Path, seq: int, peer: str, nbytes: int) -> None:
    """Change one entry and recompute its hash and every later one (the attacker knows
    the algorithm), and the head the store kept."""
    conn = _as_attacker(home)
    rows = conn.execute(f"SELECT {_COLUMNS} FROM audit_log ORDER BY seq").fetchall()
    prev = rows[seq - 2][8] if seq > 1 else "0" * 64
    for r in rows[seq - 1:]:
        r = list(r)
        if r[0] == seq:
            r[3], r[4] = peer, nbytes
        r[7] = prev
        r[8] = _digest(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7])
        conn.execute("UPDATE audit_log SET peer = ?, bytes = ?, prev_hash = ?, hash = ?"
                     " WHERE seq = ?", (r[3], r[4], r[7], r[8], r[0]))
        prev = r[8]
    _set_store_head(conn)
    conn.commit()
    conn.close()


def _status(covey, home: Path):  # type: ignore[no-untyped-def]
    result = covey("pod", "status", "--home", str(home), "--json")
    return result, json.loads(result.stdout)["audit_chain"]


def test_cutting_the_egress_record_with_the_data_key_is_detected(tmp_path: Path,
                                                                 covey) -> None:
    home = tmp_path / "pod"
    _pod_with_egress(home)  # entries 1 (pod.created) to 6
    _cut_tail(home, keep=4)  # the last two updates sent never happened, says the store
    result, chain = _status(covey, home)
    assert result.returncode == 8, result.stdout
    assert not chain["ok"] and chain["entries"] == 4
    assert "removed" in chain["reason"] and "signed head is at 6" in chain["reason"]
    assert result.stderr.startswith("error: audit log broken at entry 5")


def test_rewriting_an_egress_entry_with_a_recomputed_chain_is_detected(tmp_path: Path,
                                                                       covey) -> None:
    home = tmp_path / "pod"
    _pod_with_egress(home)
    _rewrite(home, 3, peer="nobody", nbytes=0)  # every hash and link holds again
    result, chain = _status(covey, home)
    assert result.returncode == 8, result.stdout
    assert not chain["ok"] and "differs" in chain["reason"]


def test_deleting_the_signed_head_too_is_detected(tmp_path: Path, covey) -> None:
    home = tmp_path / "pod"
    _pod_with_egress(home)
    _cut_tail(home, keep=2)
    (home / "audit.head").unlink()
    result, chain = _status(covey, home)
    assert result.returncode == 8 and "missing" in chain["reason"]


def test_a_head_the_device_did_not_sign_is_refused(tmp_path: Path) -> None:
    home, other = tmp_path / "pod", tmp_path / "other"
    _pod_with_egress(home)
    _cut_tail(home, keep=2)
    _pod_with_egress(other, n=0)  # another pod's head at entry 1: signed, but not by this one
    (home / "audit.head").write_bytes((other / "audit.head").read_bytes())
    with Pod.open(home, PASSPHRASE) as pod:
        check = pod.verify_audit_chain()
    assert not check.ok and "not signed by this device" in check.reason


def test_a_new_pod_has_a_signed_head_and_every_commit_moves_it(tmp_path: Path) -> None:
    home = tmp_path / "pod"
    with Pod.create(home, PASSPHRASE, config=FAST_CONFIG) as pod:
        head = home / "audit.head"
        assert stat.S_IMODE(head.stat().st_mode) == 0o600
        assert json.loads(head.read_text())["seq"] == 1  # pod.created
        pod.audit("export", peer="user", nbytes=10)
        assert json.loads(head.read_text())["seq"] == 2
        assert pod.verify_audit_chain().ok
        # an entry committed while the head could not move (a crash between the two):
        # the chain still verifies, and the next commit signs it
        pod.store.after_commit = None
        pod.audit("export", peer="user", nbytes=20)
        check = pod.verify_audit_chain()
        assert (check.ok, check.entries, check.signed) == (True, 3, 2)
        pod.store.after_commit = pod.audit_head.advance
        pod.audit("export", peer="user", nbytes=30)
        assert pod.verify_audit_chain().signed == 4
    assert json.loads((home / "pod.key").read_text())["audit_head"] is True


def test_the_key_files_mark_cannot_be_taken_out(tmp_path: Path) -> None:
    # Without the mark the pod would take a missing head for a pod from before, and sign
    # whatever chain it finds: the mark is bound into the data key's wrapping.
    home = tmp_path / "pod"
    _pod_with_egress(home, n=1)
    doc = json.loads((home / "pod.key").read_text())
    del doc["audit_head"]
    (home / "pod.key").write_text(json.dumps(doc))
    with pytest.raises(WrongPassphraseError):
        Pod.open(home, PASSPHRASE)


def _as_before(home: Path) -> None:
    """Make a pod look as covey left it before the signed audit head: a key file without
    the mark, no audit.head, the head kept in the store."""
    wrapped = WrappedKey.from_file(home / "pod.key")
    data_key, device_key = unwrap_keys(wrapped, PASSPHRASE)
    (home / "pod.key").write_text(wrap(data_key, PASSPHRASE, FAST_CONFIG.kdf,
                                       device_key).to_json())
    (home / "audit.head").unlink()
    conn = _as_attacker(home)
    _set_store_head(conn)
    conn.commit()
    conn.close()


def test_a_pod_from_before_adopts_its_chain_once(tmp_path: Path, covey) -> None:
    home = tmp_path / "pod"
    _pod_with_egress(home)
    _as_before(home)
    with Pod.open(home, PASSPHRASE) as pod:
        check = pod.verify_audit_chain()
        assert check.ok and check.signed == check.entries == 7
        last = pod.store.query("SELECT kind FROM audit_log ORDER BY seq DESC LIMIT 1")
        assert last[0]["kind"] == "audit.head_adopted"
    assert json.loads((home / "pod.key").read_text())["audit_head"] is True
    _cut_tail(home, keep=4)  # from then on it is protected
    result, chain = _status(covey, home)
    assert result.returncode == 8 and "removed" in chain["reason"]


def test_a_pod_from_before_with_a_broken_chain_does_not_bless_it(tmp_path: Path) -> None:
    home = tmp_path / "pod"
    _pod_with_egress(home)
    _as_before(home)
    conn = _as_attacker(home)  # its tail cut before the upgrade, the store's head not fixed
    conn.execute("DELETE FROM audit_log WHERE seq > 4")
    conn.commit()
    conn.close()
    with Pod.open(home, PASSPHRASE) as pod:
        check = pod.verify_audit_chain()
        assert not check.ok and "missing" in check.reason
    assert not (home / "audit.head").exists()
