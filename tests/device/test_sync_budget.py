"""The user's budget policy as it arrives by sync, checked as an auditor would: a bad one
is refused and counted and changes nothing; a change is in the audit log; a raise that
does not come from a current device of the user is refused, and undone where it landed."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest

from covey.device import Pod
from covey.device.assistant._feedback import set_consent
from covey.device.federation._participation import BudgetPolicy, budget_policy, set_budget_policy
from covey.device.sync._sync import PodState
from covey.protocols._crdt import Entry
from covey.protocols._hlc import HLC
from covey.protocols._session import MemoryState
from tests.device.test_sync_trust import Node, _mesh, pair


@pytest.fixture
def nodes(tmp_path: Path) -> tuple[Node, ...]:
    made = tuple(Node(tmp_path, n) for n in ("phone", "laptop", "speaker", "tv"))
    yield made  # type: ignore[misc]
    for n in made:
        n.pod.close()


def _audit(pod: Pod, kind: str) -> list[dict[str, object]]:
    return [{"peer": r["peer"], **json.loads(r["detail"])} for r in pod.store.query(
        "SELECT peer, detail FROM audit_log WHERE kind = ? ORDER BY seq", (kind,))]


@pytest.mark.parametrize("bad", [{"max_epsilon": -1.0, "delta": 1e-5},
                                 {"max_epsilon": math.nan, "delta": 1e-5},
                                 {"max_epsilon": math.inf, "delta": 1e-5},
                                 {"max_epsilon": "50", "delta": 1e-5},
                                 {"max_epsilon": True, "delta": 1e-5},
                                 {"max_epsilon": 5.0, "delta": 1.5},
                                 {"max_epsilon": 5.0},
                                 {"max_epsilon": 5.0, "delta": 1e-5, "accountant": "none"},
                                 [5.0, 1e-5]])
def test_a_bad_budget_policy_from_sync_is_refused_counted_and_not_applied(
        nodes: tuple[Node, ...], bad: object) -> None:
    phone, laptop = nodes[:2]

    async def run() -> None:
        pair(phone, laptop)
        for n in (phone, laptop):
            n.port = await n.server.start()
        set_budget_policy(laptop.pod, 3.0)
        await laptop.sync(phone)
        replica = phone.state.replica()  # the phone (a paired, current device) sends it
        replica.set("budget_policy", "policy", bad)
        await phone.sync(laptop, MemoryState(replica))
        assert laptop.sessions[-1].refused == {"invalid": 1}
        for n in (phone, laptop):
            await n.server.stop()

    asyncio.run(run())
    assert budget_policy(laptop.pod) == BudgetPolicy(3.0)  # unchanged, and still readable
    assert [a["by"] for a in _audit(laptop.pod, "budget_policy") if "by" in a] == []


def test_a_synced_budget_change_is_audited_with_who_and_what(nodes: tuple[Node, ...]) -> None:
    phone, laptop = nodes[:2]

    async def run() -> None:
        pair(phone, laptop)
        for n in (phone, laptop):
            n.port = await n.server.start()
        set_budget_policy(phone.pod, 3.0)
        await phone.sync(laptop)
        set_budget_policy(phone.pod, 12.0)  # a raise, by a current device: applied
        await laptop.sync(phone)
        for n in (phone, laptop):
            await n.server.stop()

    asyncio.run(run())
    assert budget_policy(laptop.pod).max_epsilon == 12.0
    synced = [a for a in _audit(laptop.pod, "budget_policy") if a.get("by") == "sync"]
    assert synced == [
        {"peer": phone.id, "max_epsilon": 3.0, "delta": 1e-5, "by": "sync",
         "previous_max_epsilon": 10.0, "previous_delta": 1e-5},
        {"peer": phone.id, "max_epsilon": 12.0, "delta": 1e-5, "by": "sync",
         "previous_max_epsilon": 3.0, "previous_delta": 1e-5}]


def test_a_raise_from_a_device_that_is_not_current_is_refused_and_undone(
        nodes: tuple[Node, ...]) -> None:
    """The speaker raises the budget while it is still a current device; the phone takes
    the raise, then revokes the speaker (the revocation keeps the speaker's entries the
    phone holds, the raise among them). When the raise reaches the laptop, which has heard
    of the revocation, the laptop refuses it (the speaker is no longer a current device)
    and writes its own policy again, which then wins on the phone and the tv too."""
    phone, laptop, speaker, tv = nodes

    async def run() -> None:
        for joiner in (laptop, speaker, tv):
            pair(phone, joiner)
        for n in nodes:
            n.port = await n.server.start()
        set_budget_policy(phone.pod, 2.0)
        await _mesh(nodes)
        set_budget_policy(speaker.pod, 50.0)
        await speaker.sync(phone)
        assert budget_policy(phone.pod).max_epsilon == 50.0  # from a current device
        phone.state.revoke("speaker")
        stats = await laptop.sync(phone)  # the revocation, and the raise it kept
        assert stats.refused == {"budget_raise": 1}
        assert budget_policy(laptop.pod).max_epsilon == 2.0
        await phone.sync(laptop)  # the laptop's policy, written again, wins on the phone
        await tv.sync(laptop)
        for n in nodes:
            await n.server.stop()

    asyncio.run(run())
    assert [budget_policy(n.pod).max_epsilon for n in (phone, laptop, tv)] == [2.0] * 3
    refused = _audit(laptop.pod, "sync.refused")
    assert refused == [{"peer": phone.id, "what": "budget_raise", "entries": 1,
                        "kept_max_epsilon": 2.0, "kept_delta": 1e-5}]
    assert PodState(laptop.pod).replica().get("budget_policy", "policy")["max_epsilon"] == 2.0


def test_a_backdated_raise_of_a_revoked_device_is_refused_and_dropped_where_it_landed(
        nodes: tuple[Node, ...]) -> None:
    """The revoked speaker backdates a raise to its last write the phone saw before
    revoking it, and gets it to the tv, which has not heard of the revocation. The laptop,
    which has, refuses it (the revocation did not keep it). When the revocation reaches
    the tv, the tv drops the raise and goes back to the policy it held before it."""
    phone, laptop, speaker, tv = nodes

    async def run() -> None:
        for joiner in (laptop, speaker, tv):
            pair(phone, joiner)
        for n in nodes:
            n.port = await n.server.start()
        set_budget_policy(phone.pod, 2.0)
        await _mesh(nodes)
        set_consent(speaker.pod, "analytics", False)  # a last write, seen by the phone only
        await speaker.sync(phone)
        seen = phone.state.replica().vector[speaker.id]
        phone.state.revoke("speaker")
        await laptop.sync(phone)
        assert speaker.id not in laptop.state.trust().current
        replica = speaker.state.replica()
        raise_ = Entry("budget_policy", "policy", {"max_epsilon": 50.0, "delta": 1e-5},
                       HLC(seen.wall, seen.counter, speaker.id)).signed_by(
                           speaker.pod.identity.private_key)
        replica.entries[("budget_policy", "policy")] = raise_
        await speaker.sync(tv, MemoryState(replica))
        assert budget_policy(tv.pod).max_epsilon == 50.0, tv.sessions[-1]  # it cannot know better
        held = laptop.state.replica()
        result = held.merge_entries([raise_], peer=tv.id)
        laptop.state.merged(held, result, tv.id)
        assert result.refused == {"revoked_origin": 1}
        assert budget_policy(laptop.pod).max_epsilon == 2.0
        stats = await tv.sync(laptop)  # the revocation reaches the tv
        assert stats.dropped == 1
        for n in nodes:
            await n.server.stop()

    asyncio.run(run())
    assert budget_policy(tv.pod).max_epsilon == 2.0
    assert _audit(tv.pod, "sync.dropped") == [{"peer": laptop.id, "entries": 1,
                                               "collections": {"budget_policy": 1},
                                               "writers": [speaker.id]}]
    undone = [a for a in _audit(tv.pod, "budget_policy") if a.get("by") == "revocation"]
    assert undone == [{"peer": speaker.id, "max_epsilon": 2.0, "delta": 1e-5,
                       "by": "revocation", "previous_max_epsilon": 50.0,
                       "previous_delta": 1e-5}]
    assert _audit(laptop.pod, "sync.refused") == []
