"""Sync sessions over real TCP on the loopback: three pods converge; a partition heals;
every entry received is checked against the device the channel authenticated."""

from __future__ import annotations

import asyncio
import base64

import pytest

from covey.protocols._channel import ChannelError
from covey.protocols._crdt import Entry, Replica
from covey.protocols._hlc import HLC
from covey.protocols._session import SyncServer, SyncStats, sync_with
from covey.protocols._trust import KEPT, MAX_KEPT
from tests.protocols.household import Household, public

NAMES = ("phone", "laptop", "speaker")


class Pod:
    def __init__(self, home: Household, name: str) -> None:
        self.home, self.name = home, name
        self.key = home.keys[name]
        self.replica: Replica = home[name]
        self.synced: list[SyncStats] = []
        self.refused: list[str] = []
        self.server = SyncServer(self.replica, self.key, self.pin, self.synced.append,
                                 lambda reason, _: self.refused.append(reason))
        self.port = 0

    @property
    def public(self) -> bytes:
        return public(self.key)

    def pin(self, device: bytes) -> str | None:
        trust = self.home.trust(self.name)
        ok = any(trust.device_key(d) == device for d in trust.current - {self.replica.node})
        return None if ok else "not a paired device"

    async def sync(self, other: Pod) -> SyncStats:
        return await sync_with("127.0.0.1", other.port, self.replica, self.key, self.pin)


async def _pods(n: int = 3) -> list[Pod]:
    home = Household(NAMES[:n])
    pods = [Pod(home, name) for name in NAMES[:n]]
    for p in pods:
        p.port = await p.server.start()
    return pods


def test_an_edit_on_one_pod_reaches_the_others() -> None:
    # How fast is measured by `make bench` (sync convergence), not here.
    async def run() -> None:
        phone, laptop, speaker = await _pods()
        phone.replica.set("preferences", "diet", "vegetarian")
        stats = await asyncio.gather(phone.sync(laptop), phone.sync(speaker))
        assert all(s.sent == 1 and s.collections == {"preferences"} for s in stats)
        assert laptop.replica.get("preferences", "diet") == "vegetarian"
        assert speaker.replica.get("preferences", "diet") == "vegetarian"
        assert laptop.synced[0].received == 1 and laptop.synced[0].bytes_in > 0
        for p in (phone, laptop, speaker):
            await p.server.stop()

    asyncio.run(run())


def test_partition_and_heal_converge() -> None:
    async def run() -> None:
        phone, laptop, speaker = await _pods()
        phone.replica.set("consents", "federated_training", True)
        await phone.sync(laptop)
        await phone.sync(speaker)
        # the speaker drops off; both sides keep editing
        phone.replica.set("preferences", "music", "jazz")
        laptop.replica.delete("consents", "federated_training")
        speaker.replica.set("preferences", "music", "techno")
        speaker.replica.set("preferences", "city", "Porto")
        await laptop.sync(phone)
        # it returns
        await speaker.sync(phone)
        await laptop.sync(speaker)
        await phone.sync(laptop)
        states = [p.replica.state() for p in (phone, laptop, speaker)]
        assert states[0] == states[1] == states[2]
        assert phone.replica.get("consents", "federated_training") is None  # forgotten
        assert phone.replica.get("preferences", "city") == "Porto"
        for p in (phone, laptop, speaker):
            await p.server.stop()

    asyncio.run(run())


def test_an_unpaired_pod_receives_nothing() -> None:
    async def run() -> None:
        phone, laptop = await _pods(2)
        phone.replica.set("preferences", "diet", "vegetarian")
        stranger = Pod(Household(("stranger",)), "stranger")
        stranger.pin = lambda device: None  # type: ignore[method-assign]  # it trusts anyone
        with pytest.raises(ChannelError):
            await stranger.sync(phone)
        assert stranger.replica.get("preferences", "diet") is None
        await asyncio.sleep(0.05)
        assert phone.refused and "not a paired device" in phone.refused[0]
        for p in (phone, laptop):
            await p.server.stop()

    asyncio.run(run())


def test_a_paired_peer_cannot_pass_off_entries_as_another_devices() -> None:
    """The laptop is paired and authenticated, but what it sends in the speaker's name
    (or unsigned) is refused and counted; its own signed entries go through."""
    async def run() -> None:
        phone, laptop, speaker = await _pods()
        stamp = laptop.replica.clock.now()
        speaker_id = speaker.replica.node
        forged = [Entry("consents", "federated_training", True,
                        HLC(stamp.wall, 0, speaker_id)).signed_by(laptop.key),
                  Entry("consents", "analytics", True, HLC(stamp.wall, 1, laptop.replica.node))]
        for entry in forged:
            laptop.replica.entries[(entry.collection, entry.key)] = entry
        laptop.replica.set("preferences", "diet", "vegan")
        stats = await laptop.sync(phone)
        assert phone.synced[-1].refused == {"bad_signature": 1, "unsigned": 1}
        assert stats.sent == 3
        assert phone.replica.get("consents", "federated_training") is None
        assert phone.replica.get("consents", "analytics") is None
        assert phone.replica.get("preferences", "diet") == "vegan"
        for p in (phone, laptop, speaker):
            await p.server.stop()

    asyncio.run(run())


def test_a_revoked_device_with_many_entries_reaches_a_new_pod_whole() -> None:
    """The speaker wrote 5,000 memories (more than one kept list holds, and more bytes
    than one message); the phone revokes it. The laptop, which holds none of them yet, gets
    everything in one session, split by size: the revocation, its two kept lists, and every
    memory they keep."""
    async def run() -> None:
        phone, laptop, speaker = await _pods()
        for i in range(5000):
            speaker.replica.set("memories", f"m{i}", {"kind": "note",
                                                      "text": f"note {i:05d} " + "x" * 150})
        assert not phone.replica.merge_entries(speaker.replica.entries.values()).refused
        rotation = phone.home.revoke("phone", "speaker")
        lists = [len(base64.b64decode(e.value["ids"])) // 16
                 for e in rotation if e.collection == KEPT]
        assert sorted(lists) == [5000 - MAX_KEPT, MAX_KEPT]
        stats = await laptop.sync(phone)
        assert stats.received > 5000 and stats.bytes_in > 1 << 20 and not stats.refused
        assert laptop.replica.items("memories") == phone.replica.items("memories")
        assert len(laptop.replica.items("memories")) == 5000
        trust = laptop.home.trust("laptop")
        assert trust.revocation(speaker.replica.node) is not None
        kept = trust.kept[speaker.replica.node]
        assert kept is not None and len(kept) == 5000
        for p in (phone, laptop, speaker):
            await p.server.stop()

    asyncio.run(run())
