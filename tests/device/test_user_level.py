"""User-level, in fact: one training identity per user per round, whatever the number of
the user's pods. An attacker's view: a user with three pods must not be sampled three
times as often, nor contribute three updates to a round."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from covey.aggregator._strategy import PodUpdate, aggregate
from covey.device import Pod
from covey.device.federation._budget import pod_ledger
from covey.device.federation._participation import round_identity
from covey.device.sync._sync import PodState
from covey.privacy import (
    BudgetExceeded,
    DPConfig,
    GaussianRounds,
    LedgerTampered,
    Release,
    epsilon_spent,
    poisson_sample,
)
from tests.conftest import FAST_CONFIG, PASSPHRASE


def _one_users_pods(tmp_path: Path, n: int) -> list[Pod]:
    """``n`` pods holding one user key, each knowing every device's certificate (what
    pairing and sync leave behind)."""
    pods = [Pod.create(tmp_path / f"pod{i}", PASSPHRASE, name=f"pod{i}", config=FAST_CONFIG)
            for i in range(n)]
    first = PodState(pods[0])
    user = first.ensure_user()
    for pod in pods[1:]:
        first.certify(user, pod.identity.public_key, pod.name)
    sponsor = pods[0].identity.device_id
    for pod in pods[1:]:  # what pairing does once the person typed the codes
        state = PodState(pod)
        state.adopt_user_key(user.private_bytes(), user.user_id)
        replica = state.replica()
        state.merged(replica, replica.merge(first.replica().delta_for({}), sponsor), sponsor)
    return pods


@pytest.fixture
def trio(tmp_path: Path):  # type: ignore[no-untyped-def]
    pods = _one_users_pods(tmp_path, 3)
    yield pods
    for pod in pods:
        pod.close()


def test_exactly_one_of_a_users_pods_answers_each_round(trio: list[Pod]) -> None:
    picks = []
    for rnd in range(1, 301):
        answers = [round_identity(p, "run-x", rnd) for p in trio]
        assert sum(designated for designated, _ in answers) == 1
        assert len({token for _, token in answers}) == 1  # one user, one token
        picks.append(next(i for i, (d, _) in enumerate(answers) if d))
    counts = np.bincount(picks, minlength=3)
    # each pod about a third of the rounds: 100 +- 8.2 (sd); 5 sd of margin
    assert all(abs(c - 100) < 41 for c in counts), counts


def test_a_users_tokens_do_not_link_rounds(trio: list[Pod]) -> None:
    tokens = {round_identity(trio[0], run, rnd)[1] for run in ("a", "b") for rnd in range(50)}
    assert len(tokens) == 100


def test_a_user_with_three_pods_is_sampled_at_the_rate_of_one(trio: list[Pod]) -> None:
    # The aggregator samples nodes at rate q; only the designated pod answers, so the
    # user is in a round with probability q, which is what the accountant assumes.
    q, rounds = 0.2, 3000
    nodes = {i + 1: pod for i, pod in enumerate(trio)}
    included = 0
    for rnd in range(1, rounds + 1):
        sampled = poisson_sample(list(nodes), q, rnd.to_bytes(32, "big"))
        included += any(round_identity(nodes[n], "run-q", rnd)[0] for n in sampled)
    sd = (q * (1 - q) / rounds) ** 0.5
    assert abs(included / rounds - q) < 5 * sd  # 1 - (1 - q)^3 = 0.488 without it


def test_an_unpaired_pod_is_its_own_user(tmp_path: Path) -> None:
    with Pod.create(tmp_path / "alone", PASSPHRASE, config=FAST_CONFIG) as pod:
        assert all(round_identity(pod, "run", r)[0] for r in range(1, 20))


def test_the_aggregator_takes_one_update_per_user_per_round() -> None:
    dp = DPConfig(mode="central", noise_multiplier=1.0, clip_norm=1.0)
    ones = np.full(16, 0.1, np.float32)
    updates = [PodUpdate(1, ones, 0, "v1", user_token="u1"),
               PodUpdate(2, ones, 0, "v1", user_token="u1"),  # the same user's other pod
               PodUpdate(3, ones, 0, "v1", user_token="u2"),
               PodUpdate(4, ones, 0, "v1")]  # no token: counted as its own user
    result = aggregate(updates, 16, "v1", dp, expected_pods=3.0)
    assert result.accepted == 3 and result.rejected == {"duplicate_user": 1}


def _sync(source: Pod, target: Pod) -> dict[str, int]:
    """One direction of a sync session, in-process: what ``source`` publishes, merged by
    ``target`` with ``source`` as the authenticated peer. Returns what was refused."""
    peer = source.identity.device_id
    sender = PodState(source)
    sender.publish()
    state = PodState(target)
    replica = state.replica()
    result = replica.merge(sender.replica().delta_for({}), peer)
    state.merged(replica, result, peer)
    return dict(result.refused)


def _release(run: str, mode: str = "local", z: float = 2.0) -> Release:
    sensitivity = 2.0 if mode == "local" else 1.0
    return Release("federated_update", run, 1, mode, z, 1.0, sensitivity, 1.0, 1, 1, 1e-6)


def test_a_users_budget_counts_every_one_of_their_pods(trio: list[Pod]) -> None:
    # The attack: one person spends their maximum on each of their pods. Once the pods
    # have synced, each pod composes the others' spend and refuses past the maximum.
    phone, laptop, _ = trio
    mine = pod_ledger(phone)
    for run in ("run-1", "run-2", "run-3"):
        mine.spend(_release(run))  # 9.01 of the default maximum of 10; a fourth: 10.73
    assert _sync(phone, laptop) == {}
    theirs = pod_ledger(laptop)
    assert theirs.spent() == pytest.approx(mine.spent())
    check = theirs.verify()
    assert check.ok and check.unverified == []  # the phone's entries verify by its key
    with pytest.raises(BudgetExceeded):
        theirs.spend(_release("run-4"))
    assert len(theirs.history()) == 3


def test_a_pod_cannot_publish_or_change_another_pods_spend(trio: list[Pod]) -> None:
    phone, laptop, speaker = trio
    pod_ledger(phone).spend(_release("run-1"))
    _sync(phone, laptop)
    entry = pod_ledger(laptop).history()[0].to_dict()
    # the laptop publishes the phone's entry, changed to charge nothing, as its own
    forged = {**entry, "release": {**entry["release"], "rounds": 0}}
    PodState(laptop).edit(lambda r: [r.add("ledger", forged)])
    assert _sync(laptop, speaker) == {"foreign_ledger": 1}
    # the phone itself cannot rewrite its own entry either: the row's hash and signature
    PodState(phone).edit(lambda r: [r.add("ledger", forged)])
    assert sum(_sync(phone, speaker).values()) == 1
    assert [e.release.rounds for e in pod_ledger(speaker).history()] == [1]


def test_a_pod_put_back_to_an_earlier_copy_and_spent_again_is_caught(
        tmp_path: Path) -> None:
    # The attacker keeps a copy of the phone's home (store and signed head), spends the
    # budget, puts the copy back and spends it again. The laptop, which holds the first
    # spend, gives it back at the next sync: both branches count, and the phone's own
    # ledger no longer verifies, so it releases nothing more.
    phone, laptop = _one_users_pods(tmp_path, 2)
    home = phone.home
    phone.close()
    shutil.copytree(home, tmp_path / "copy")
    phone = Pod.open(home, PASSPHRASE, config=FAST_CONFIG)
    for run in ("run-1", "run-2", "run-3"):
        pod_ledger(phone).spend(_release(run))  # 9.01 of 10
    _sync(phone, laptop)
    phone.close()
    shutil.rmtree(home)
    shutil.copytree(tmp_path / "copy", home)
    phone = Pod.open(home, PASSPHRASE, config=FAST_CONFIG)
    try:
        assert pod_ledger(phone).verify().ok  # a whole earlier copy: nothing shows yet
        for run in ("run-4", "run-5", "run-6"):
            pod_ledger(phone).spend(_release(run))
        _sync(laptop, phone)
        _sync(phone, laptop)
        six = epsilon_spent([GaussianRounds(1.0, 1.0, 6)], 1e-5)  # 13.78
        for pod in (phone, laptop):
            assert pod_ledger(pod).spent() == pytest.approx(six)
        check = pod_ledger(phone).verify()
        assert not check.ok and "rolled back" in check.reason
        assert pod_ledger(laptop).verify().forked == [phone.identity.device_id]
        with pytest.raises(LedgerTampered):
            pod_ledger(phone).spend(_release("run-7", z=100.0))
    finally:
        phone.close()
        laptop.close()


def test_the_data_key_alone_cannot_drop_other_pods_spend_or_raise_the_maximum(
        tmp_path: Path) -> None:
    from tests.device.test_ledger import _as_attacker

    phone, laptop = _one_users_pods(tmp_path, 2)
    for run in ("run-1", "run-2", "run-3"):
        pod_ledger(phone).spend(_release(run))
    _sync(phone, laptop)
    home = laptop.home
    laptop.close()
    phone.close()
    other = phone.identity.device_id
    for attack in (f"DELETE FROM privacy_ledger WHERE device_id = '{other}'",
                   "INSERT OR REPLACE INTO meta (key, value) VALUES ('privacy.max_epsilon',"
                   " '1000.0')"):
        shutil.copytree(home, tmp_path / "attacked", dirs_exist_ok=False)
        _as_attacker(tmp_path / "attacked", attack)
        with Pod.open(tmp_path / "attacked", PASSPHRASE, config=FAST_CONFIG) as pod:
            check = pod_ledger(pod).verify()
            assert not check.ok, attack
            with pytest.raises(LedgerTampered):
                pod_ledger(pod).spend(_release("run-4"))
        shutil.rmtree(tmp_path / "attacked")


def test_a_revoked_devices_spend_still_counts(trio: list[Pod]) -> None:
    # The speaker spent, its entries reached only the laptop, then the phone (which had
    # not seen them) revoked it. Dropping what the revocation did not keep would forget
    # spend that happened: ledger entries are kept whatever the revocation lists.
    phone, laptop, speaker = trio
    pod_ledger(speaker).spend(_release("run-s", z=4.0))
    spent = pod_ledger(speaker).spent()
    _sync(speaker, laptop)
    PodState(phone).revoke(speaker.identity.device_id, "lost")
    _sync(phone, laptop)
    _sync(laptop, phone)
    for pod in (phone, laptop):
        assert pod_ledger(pod).spent() == pytest.approx(spent)
