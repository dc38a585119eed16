"""The shared state of a user's pods converges whatever the network does to deltas."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from covey.protocols._crdt import Delta, Entry, Replica
from covey.protocols._hlc import HLC, ClockDriftError, HybridClock

NODES = ("phone", "laptop", "speaker")
KEYS = ("diet", "sister", "city", "music")


class FakeTime:
    def __init__(self) -> None:
        self.ms = 1_700_000_000_000

    def reader(self, skew: int) -> Callable[[], int]:
        return lambda: self.ms + skew


op = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 2), st.sampled_from(KEYS), st.integers(0, 9)),
    st.tuples(st.just("delete"), st.integers(0, 2), st.sampled_from(KEYS), st.just(0)),
    st.tuples(st.just("send"), st.integers(0, 2), st.integers(0, 2), st.just(0)),
    st.tuples(st.just("deliver"), st.integers(0, 50), st.booleans(), st.just(0)),
    st.tuples(st.just("tick"), st.integers(0, 3), st.just(""), st.integers(0, 5)),
)


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(op, max_size=60), skews=st.tuples(*[st.integers(-500, 500)] * 3))
def test_replicas_converge_under_reordered_and_repeated_deliveries(
        ops: list[tuple], skews: tuple[int, int, int]) -> None:
    clock = FakeTime()
    replicas = [Replica(n, HybridClock(n, clock.reader(s)))
                for n, s in zip(NODES, skews, strict=True)]
    in_flight: list[tuple[int, dict]] = []  # (receiver, wire form of a delta)
    writes: list[Entry] = []
    for kind, a, b, c in ops:
        if kind == "set":
            writes.append(replicas[a].set("preferences", b, c))
        elif kind == "delete":
            writes.append(replicas[a].delete("preferences", b))
        elif kind == "send" and a != b:
            delta = replicas[a].delta_for(replicas[b].vector)
            in_flight.append((b, json.loads(json.dumps(delta.to_dict()))))
        elif kind == "deliver" and in_flight:
            receiver, wire = in_flight[a % len(in_flight)]
            replicas[receiver].merge(Delta.from_dict(wire))
            if b:  # delivered, not kept: otherwise it may be delivered again later
                in_flight.pop(a % len(in_flight))
        elif kind == "tick":
            clock.ms += c * 7
    for _ in range(2):  # anti-entropy: every pair, both ways
        for src in replicas:
            for dst in replicas:
                if src is not dst:
                    dst.merge(src.delta_for(dst.vector))
    states = [r.state() for r in replicas]
    assert states[0] == states[1] == states[2]
    # Each key holds its last write by hybrid time (a delete leaves a tombstone).
    for key in KEYS:
        mine = [w for w in writes if w.key == key]
        if mine:
            last = max(mine, key=lambda w: w.stamp)
            assert states[0][("preferences", key)] == (last.value, last.deleted)
        else:
            assert ("preferences", key) not in states[0]


def test_forgetting_on_one_pod_forgets_on_all_and_stale_writes_stay_dead() -> None:
    phone, laptop = Replica("phone"), Replica("laptop")
    stale = laptop.set("memories", "m1", "my sister is Ana")
    phone.merge(laptop.delta_for(phone.vector))
    assert phone.get("memories", "m1") == "my sister is Ana"
    phone.delete("memories", "m1")
    laptop.merge(phone.delta_for(laptop.vector))
    assert laptop.get("memories", "m1") is None and laptop.items("memories") == {}
    assert laptop.merge_entries([stale]) == 0  # the old write, replayed, changes nothing
    assert laptop.get("memories", "m1") is None


def test_sync_sends_only_what_the_peer_lacks() -> None:
    phone, laptop = Replica("phone"), Replica("laptop")
    for i in range(20):
        phone.set("preferences", f"k{i}", i)
    assert len(phone.delta_for(laptop.vector).entries) == 20
    laptop.merge(phone.delta_for(laptop.vector))
    assert phone.delta_for(laptop.vector).entries == ()
    phone.set("preferences", "k3", "changed")
    assert [e.key for e in phone.delta_for(laptop.vector).entries] == ["k3"]


def test_malformed_entries_are_rejected() -> None:
    good = Replica("phone").set("consents", "federated_training", True).to_dict()
    for broken in ({**good, "c": "passwords"}, {**good, "t": "yesterday"},
                   {**good, "d": True}, {**good, "d": "no"}, {"c": "consents"}):
        with pytest.raises((ValueError, KeyError, TypeError)):
            Entry.from_dict(broken)
    with pytest.raises(ValueError, match="another node"):
        Delta.from_dict({"entries": [], "vector": {"phone": HLC(1, 0, "laptop").encode()}})


def test_hybrid_clock_is_monotonic_and_refuses_a_clock_far_ahead() -> None:
    now = [1_000_000]
    clock = HybridClock("phone", lambda: now[0])
    first = clock.now()
    now[0] -= 5_000  # the wall clock steps back
    assert clock.now() > first
    ahead = HLC(now[0] + 10_000, 3, "laptop")
    assert clock.observe(ahead) > ahead
    with pytest.raises(ClockDriftError):
        clock.observe(HLC(now[0] + 3_600_000, 0, "liar"))
    assert HLC.decode(first.encode()) == first
