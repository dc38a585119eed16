"""The privacy ledger as an attacker with the data key sees it: rows cannot be removed or
rewritten unseen, the device key is not in the store, and a run cannot change the
parameters a user's spend was accounted with."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import sqlcipher3.dbapi2 as sqlite

from covey.device import Pod
from covey.device.federation._budget import HEAD_FILE, pod_ledger
from covey.device.store._keys import WrappedKey, unwrap, wrap
from covey.errors import WrongPassphraseError
from covey.privacy import (
    BudgetExceeded,
    BudgetPolicy,
    GaussianRounds,
    LedgerTampered,
    Release,
    RunChanged,
    epsilon_spent,
)
from tests.conftest import FAST_CONFIG, PASSPHRASE


def _central(run: str = "run-1", z: float = 1.0, rounds: int = 3) -> Release:
    return Release("federated_update", run, 1, "central", z, 1.0, 1.0, 0.5, rounds, rounds,
                   1e-6)


def _local(run: str, z: float = 2.0) -> Release:
    return Release("federated_update", run, 1, "local", z, 1.0, 2.0, 1.0, 1, 1, 1e-6)


def _with_spend(home: Path) -> float:
    with Pod.create(home, PASSPHRASE, config=FAST_CONFIG) as pod:
        ledger = pod_ledger(pod)
        ledger.spend(_central())
        ledger.spend(_local("run-2"))
        return ledger.spent()


def _as_attacker(home: Path, *sql: str) -> None:
    """Rewrite the store holding the data key alone (not the passphrase's other secrets,
    not the device key): SQLCipher opened with the raw key, triggers dropped."""
    data_key = unwrap(WrappedKey.from_file(home / "pod.key"), PASSPHRASE)
    conn = sqlite.connect(str(home / "pod.db"))
    conn.execute(f"PRAGMA key = \"x'{data_key.hex()}'\"")
    conn.execute("DROP TRIGGER IF EXISTS privacy_ledger_no_delete")
    conn.execute("DROP TRIGGER IF EXISTS privacy_ledger_no_update")
    for statement in sql:
        conn.execute(statement)
    conn.commit()
    conn.close()


@pytest.mark.parametrize("attack", [
    ["DELETE FROM privacy_ledger WHERE seq = 2"],  # cut the last release
    ["DELETE FROM privacy_ledger"],  # start over with a fresh budget
])
def test_removing_releases_with_the_data_key_is_detected(tmp_path: Path,
                                                         attack: list[str]) -> None:
    home = tmp_path / "pod"
    before = _with_spend(home)
    _as_attacker(home, *attack)
    with Pod.open(home, PASSPHRASE) as pod:
        ledger = pod_ledger(pod)
        assert ledger.spent() < before  # what the attacker gained, had it gone unseen
        check = ledger.verify()
        assert not check.ok and "removed" in check.reason
        with pytest.raises(LedgerTampered):
            ledger.spend(_local("run-3"))


def test_deleting_the_signed_head_too_is_detected(tmp_path: Path) -> None:
    home = tmp_path / "pod"
    _with_spend(home)
    _as_attacker(home, "DELETE FROM privacy_ledger")
    (home / HEAD_FILE).unlink()
    with Pod.open(home, PASSPHRASE) as pod:
        check = pod_ledger(pod).verify()
        assert not check.ok and "head is missing" in check.reason


def test_rewriting_a_release_with_a_recomputed_chain_is_detected(tmp_path: Path) -> None:
    # The attacker knows the hash algorithm: they make the first release charge nothing
    # and recompute every hash, but cannot sign without the device key.
    home = tmp_path / "pod"
    _with_spend(home)
    with Pod.open(home, PASSPHRASE) as pod:
        entries = pod_ledger(pod).history()
    forged = []
    prev = "0" * 64
    for e in entries:
        body = json.loads(e.body())
        body["release"]["rounds"] = 0
        digest = hashlib.sha256(
            prev.encode() + json.dumps(body, sort_keys=True, separators=(",", ":"),
                                       ensure_ascii=True).encode()).hexdigest()
        forged.append((json.dumps(body, sort_keys=True, separators=(",", ":")), prev, digest,
                       e.seq))
        prev = digest
    _as_attacker(home, *[f"UPDATE privacy_ledger SET body = '{b}', prev_hash = '{p}', "
                         f"hash = '{d}' WHERE seq = {s}" for b, p, d, s in forged])
    with Pod.open(home, PASSPHRASE) as pod:
        ledger = pod_ledger(pod)
        assert ledger.spent() == 0.0  # the forgery, had it been believed
        check = ledger.verify()
        assert not check.ok and "signed" in check.reason


def test_the_device_key_is_not_in_the_store(tmp_path: Path) -> None:
    home = tmp_path / "pod"
    with Pod.create(home, PASSPHRASE, config=FAST_CONFIG) as pod:
        raw = pod.identity.private_key.private_bytes_raw()
        stored = pod.store.query("SELECT private_key FROM identity")[0][0]
        assert bytes(stored) == b""
    assert raw not in (home / "pod.db").read_bytes()
    # Taking the device key out of the key file (so that the pod would read one the
    # attacker put in the store) breaks the unwrap: the data key is bound to it.
    doc = json.loads((home / "pod.key").read_text())
    del doc["device_key"]
    (home / "pod.key").write_text(json.dumps(doc))
    with pytest.raises(WrongPassphraseError):
        Pod.open(home, PASSPHRASE)


def test_an_older_pod_moves_its_key_and_reaccounts_its_ledger(tmp_path: Path) -> None:
    home = tmp_path / "pod"
    with Pod.create(home, PASSPHRASE, config=FAST_CONFIG) as pod:
        raw = pod.identity.private_key.private_bytes_raw()
        device = pod.identity.device_id
    # As covey left a pod before: the device key in the store, a key file without it,
    # no signed head, and a local-mode ledger row charged at sensitivity C.
    data_key = unwrap(WrappedKey.from_file(home / "pod.key"), PASSPHRASE)
    (home / "pod.key").write_text(wrap(data_key, PASSPHRASE, FAST_CONFIG.kdf).to_json())
    (home / HEAD_FILE).unlink()
    _as_attacker(home, f"UPDATE identity SET private_key = x'{raw.hex()}'",
                 "INSERT INTO ledger_v6 (run_id, round, mode, mechanism, accountant, epsilon,"
                 " delta, noise_multiplier, clip_norm, sample_rate, rounds, model_version,"
                 " created_at) VALUES ('old', 1, 'local', 'gaussian', 'rdp', 4.73, 1e-5, 1.0,"
                 " 1.0, 1.0, 1, 'v1', '2026-01-01T00:00:00')")
    with Pod.open(home, PASSPHRASE) as pod:
        assert pod.identity.device_id == device
        assert bytes(pod.store.query("SELECT private_key FROM identity")[0][0]) == b""
        ledger = pod_ledger(pod)
        assert ledger.verify().ok
        # one local release of z = 1 at sensitivity 2C: epsilon 10.73, not 4.73
        assert ledger.spent() == pytest.approx(
            epsilon_spent([GaussianRounds(0.5, 1.0, 1)], 1e-5), rel=1e-6)
        assert pod.store.query("SELECT COUNT(*) FROM ledger_v6")[0][0] == 0
    assert "device_key" in json.loads((home / "pod.key").read_text())
    with Pod.open(home, PASSPHRASE) as pod:  # nothing adopted twice
        assert len(pod_ledger(pod).history()) == 1


def test_a_run_cannot_change_what_its_spend_was_accounted_with(pod: Pod) -> None:
    ledger = pod_ledger(pod)
    ledger.spend(_central("run-1", z=1.0))
    for changed in (_central("run-1", z=0.5), _central("run-1", rounds=30),
                    Release("federated_update", "run-1", 2, "central", 1.0, 1.0, 1.0, 1.0,
                            3, 0, 1e-6)):  # q from 0.5 to 1
        with pytest.raises(RunChanged) as info:
            ledger.spend(changed)
        assert not any(ch.isdigit() for ch in str(info.value).replace("run-1", ""))
    # the same parameters in a later round charge nothing more
    same = Release("federated_update", "run-1", 2, "central", 1.0, 1.0, 1.0, 0.5, 3, 0, 1e-6)
    before = ledger.spent()
    ledger.spend(same)
    assert ledger.spent() == before
    assert len(ledger.history()) == 2


def test_the_budget_refusal_says_no_figures(pod: Pod) -> None:
    from covey.device.federation._budget import set_budget_policy

    set_budget_policy(pod, 1.0)
    with pytest.raises(BudgetExceeded) as info:
        pod_ledger(pod).spend(_central())
    assert not any(ch.isdigit() for ch in str(info.value))
    assert pod_ledger(pod).history() == []


def test_a_restored_pod_keeps_the_users_spend(tmp_path: Path) -> None:
    home = tmp_path / "old"
    spent = _with_spend(home)
    with Pod.open(home, PASSPHRASE) as pod:
        document = pod.export()
    with Pod.create(tmp_path / "new", PASSPHRASE, config=FAST_CONFIG) as twin:
        twin.restore(document)
        ledger = pod_ledger(twin)
        check = ledger.verify()
        assert check.ok and check.unverified == []  # the old device's key came along
        assert ledger.spent() == pytest.approx(spent)
        twin_id = twin.identity.device_id
        assert {e.device_id for e in ledger.history()} == {document["pod"]["device_id"]}
        ledger.spend(_local("run-9"))  # the new device starts its own chain
        assert [e.seq for e in ledger.history() if e.device_id == twin_id] == [1]


def _round(run: str, rnd: int, rounds: int) -> Release:
    return Release("federated_update", run, rnd, "central", 2.0, 1.0, 1.0, 0.5, 3, rounds,
                   1e-6)


@pytest.mark.parametrize(("rounds_b", "pods"), [(2, 1), (1, 2)])
def test_a_central_run_is_charged_once_per_user_at_the_pods_that_answered_a_round(
        tmp_path: Path, rounds_b: int, pods: int) -> None:
    # Pod a answered run-1's round 1 and charged the run; pod b, not yet synced, charges it
    # again when it answers. Round 2 (the designated device, as it should be): one charge
    # at z. Round 1 too (two pods holding different user keys while a new one spread):
    # the user sent two updates to one round, 2C, so the run is charged at z / 2.
    with Pod.create(tmp_path / "a", PASSPHRASE, config=FAST_CONFIG) as a:
        pod_ledger(a).spend(_round("run-1", 1, 3))
        document = a.export()
    with Pod.create(tmp_path / "b", PASSPHRASE, config=FAST_CONFIG) as b:
        b.restore(document)  # stands in for sync: a's signed entries reach b
        ledger = pod_ledger(b)
        ledger.spend(_round("run-1", rounds_b, 3))
        assert len(ledger.history()) == 2
        run = GaussianRounds(2.0 / pods, 0.5, 3)
        assert ledger.spent() == pytest.approx(epsilon_spent([run], ledger.policy.delta))
        # local releases are each a release of the user's data: both count
        ledger.spend(_local("run-2", z=8.0))
        ledger.spend(_local("run-3", z=8.0))
        assert ledger.spent() == pytest.approx(epsilon_spent(
            [run, GaussianRounds(4.0, 1.0, 2)], ledger.policy.delta))


def test_budget_policy_is_validated() -> None:
    with pytest.raises(ValueError):
        BudgetPolicy(max_epsilon=-1.0)
    with pytest.raises(ValueError):
        BudgetPolicy(delta=1.0)
    with pytest.raises(ValueError):
        BudgetPolicy(accountant="nope")
    assert np.isfinite(BudgetPolicy().max_epsilon)
