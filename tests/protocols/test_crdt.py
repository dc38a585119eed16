"""The shared state of a user's pods converges whatever the network does to deltas, and
what an attacker slips in (unsigned, altered, forged-origin entries, tombstones and
overwrites of grow-only entries, writes by strangers) is refused in every order."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from covey.protocols._crdt import Delta, Entry, Replica, grow_only
from covey.protocols._hlc import HLC, ClockDriftError, HybridClock
from covey.protocols._identity import UserKey, device_id_of
from covey.protocols._trust import USER_SCHEMA, user_schema, user_trust
from tests.protocols.household import Household, public

NAMES = ("phone", "laptop", "speaker")
KEYS = ("diet", "sister", "city", "music")
T0 = 1_700_000_000_000


class FakeTime:
    def __init__(self) -> None:
        self.ms = T0

    def reader(self, skew: int) -> Callable[[], int]:
        return lambda: self.ms + skew


def _attacks(home: Household) -> list[Entry]:
    """Entries an attacker on the network, or a stranger, could send; all must be refused."""
    honest = Entry("preferences", "diet", "vegan", HLC(T0 + 9, 0, home.ids["laptop"])
                   ).signed_by(home.keys["laptop"])  # a write the laptop signed, then altered
    intruder = Ed25519PrivateKey.generate()
    cert_entry = home.certificates[1]
    stranger = UserKey.generate_for(public(intruder))
    stamp = HLC(T0 + 1, 0, home.ids["laptop"])
    return [
        replace(honest, signature=""),  # unsigned
        replace(honest, value="carnivore"),  # altered after signing
        # claims to come from the laptop, signed by an intruder's key
        Entry("preferences", "diet", "carnivore", HLC(T0 + 9, 0, home.ids["laptop"]))
        .signed_by(intruder),
        # a device nobody certified writes in its own name
        Entry("consents", "federated_training", True,
              HLC(T0 + 9, 0, device_id_of(public(intruder)))).signed_by(intruder),
        # a paired device tombstones a certificate, and rewrites one under its key
        Entry("devices", cert_entry.key, None, stamp, deleted=True)
        .signed_by(home.keys["laptop"]),
        Entry("devices", cert_entry.key, {**cert_entry.value, "name": "x"}, stamp)
        .signed_by(home.keys["laptop"]),
        # a certificate for the intruder, signed by another user's key
        Entry("devices", "x", stranger.certify(public(intruder), "evil").to_dict(), stamp)
        .signed_by(home.keys["laptop"]),
        # a collection the schema does not have
        Entry("passwords", "bank", "hunter2", stamp).signed_by(home.keys["laptop"]),
    ]


op = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 2), st.sampled_from(KEYS), st.integers(0, 9)),
    st.tuples(st.just("delete"), st.integers(0, 2), st.sampled_from(KEYS), st.just(0)),
    st.tuples(st.just("send"), st.integers(0, 2), st.integers(0, 2), st.just(0)),
    st.tuples(st.just("deliver"), st.integers(0, 50), st.booleans(), st.just(0)),
    st.tuples(st.just("attack"), st.integers(0, 2), st.integers(0, 7), st.just(0)),
    st.tuples(st.just("tick"), st.integers(0, 3), st.just(""), st.integers(0, 5)),
)


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(op, max_size=60), skews=st.tuples(*[st.integers(-500, 500)] * 3))
def test_replicas_converge_and_refuse_every_attack_in_any_order(
        ops: list[tuple], skews: tuple[int, int, int]) -> None:
    clock = FakeTime()
    skew = dict(zip(NAMES, skews, strict=True))
    home = Household(NAMES, clock=lambda name: clock.reader(skew[name]))
    replicas = [home[n] for n in NAMES]
    attacks = _attacks(home)
    honest_keys = set(replicas[1].entries)
    in_flight: list[tuple[int, dict]] = []  # (receiver, wire form of a delta)
    writes: list[Entry] = []
    refused = 0
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
        elif kind == "attack":
            wire = json.loads(json.dumps(attacks[b].to_dict()))
            result = replicas[a].merge(Delta((Entry.from_dict(wire),), {}))
            assert not result.changed and sum(result.refused.values()) == 1
            refused += 1
        elif kind == "tick":
            clock.ms += c * 7
    for _ in range(2):  # anti-entropy: every pair, both ways
        for src in replicas:
            for dst in replicas:
                if src is not dst:
                    dst.merge(src.delta_for(dst.vector))
    states = [r.state() for r in replicas]
    assert states[0] == states[1] == states[2]
    # Nothing but the certificates and honest writes is held anywhere.
    assert {k for k in states[0] if k[0] != "preferences"} <= honest_keys
    assert all(home.trust(n).current == frozenset(home.ids.values()) for n in NAMES)
    # Each key holds its last write by hybrid time (a delete leaves a tombstone).
    for key in KEYS:
        mine = [w for w in writes if w.key == key]
        if mine:
            last = max(mine, key=lambda w: w.stamp)
            assert states[0][("preferences", key)] == (last.value, last.deleted)
        else:
            assert ("preferences", key) not in states[0]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), cuts=st.lists(st.integers(0, 40), max_size=5))
def test_merge_is_commutative_associative_and_idempotent_with_attacks(
        seed: int, cuts: list[int]) -> None:
    home = Household(NAMES)
    rng = random.Random(seed)
    pool: list[Entry] = []
    for i in range(24):
        writer = home[rng.choice(NAMES)]
        key = rng.choice(KEYS)
        pool.append(writer.delete("consents", key) if i % 5 == 4
                    else writer.set("consents", key, rng.random() < 0.5))
    pool += _attacks(home)
    rng.shuffle(pool)

    def fresh(order: list[Entry], groups: list[int]) -> dict:
        # Another replica of the same user, holding the certificates (a fixed trust).
        r = Replica("dev-observer", USER_SCHEMA, trust=user_trust(home.user.user_id))
        r.merge_entries(home.certificates)
        bounds = sorted({0, len(order), *(g % (len(order) + 1) for g in groups)})
        for lo, hi in itertools.pairwise(bounds):
            r.merge_entries(order[lo:hi])
        r.merge_entries(order[: len(order) // 2])  # again: nothing changes
        return r.state()

    first = fresh(pool, cuts)
    again = pool[:]
    rng.shuffle(again)
    assert fresh(again, [c * 3 for c in cuts]) == first
    assert fresh(list(reversed(pool)), []) == first


def test_grow_only_entries_are_never_overwritten_or_deleted() -> None:
    home = Household(("phone", "laptop"))
    phone = home["phone"]
    cert = home.certificates[1]
    with pytest.raises(ValueError, match="grow-only"):
        phone.delete("devices", cert.key)
    with pytest.raises(ValueError, match="grow-only"):
        phone.set("devices", cert.key, {**cert.value, "name": "mine now"})
    assert phone.add("devices", cert.value) == cert  # adding it again changes nothing
    laptop = home.ids["laptop"]
    tomb = Entry("devices", cert.key, None, HLC(T0, 0, laptop), deleted=True)
    result = phone.merge_entries([tomb.signed_by(home.keys["laptop"])])
    assert result.refused == {"tombstone": 1} and phone.get("devices", cert.key) == cert.value


def test_a_new_collection_is_one_registration_with_its_verify_function() -> None:
    def verify_row(entry: Entry, trust: object, current: Entry | None) -> None:
        if entry.value.get("device") != entry.origin or entry.value.get("epsilon", -1) < 0:
            raise ValueError("a ledger row names its own device and spends epsilon >= 0")

    schema = user_schema(grow_only("ledger", verify=verify_row))
    home = Household(("phone", "laptop"), schema=schema)
    phone, laptop = home["phone"], home["laptop"]
    row = laptop.add("ledger", {"device": laptop.node, "run": "r1", "epsilon": 0.5})
    assert not phone.merge(laptop.delta_for(phone.vector)).refused
    assert phone.items("ledger") == {row.key: row.value}
    stamp = HLC(T0, 5, laptop.node)
    bad = [Entry("ledger", row.key, None, stamp, deleted=True),  # erase a spend
           Entry("ledger", "k", {"device": phone.node, "epsilon": 1.0}, stamp),  # another's row
           Entry("ledger", "k", {"device": laptop.node, "epsilon": -3.0}, stamp)]
    from covey.protocols._crdt import content_key

    bad = [replace(b, key=b.key if b.deleted else content_key(b.value)) for b in bad]
    result = phone.merge_entries([b.signed_by(home.keys["laptop"]) for b in bad])
    assert result.refused == {"tombstone": 1, "invalid": 2}
    assert phone.items("ledger") == {row.key: row.value}


def test_forgetting_on_one_pod_forgets_on_all_and_stale_writes_stay_dead() -> None:
    home = Household(("phone", "laptop"))
    phone, laptop = home["phone"], home["laptop"]
    stale = laptop.set("memories", "m1", "my sister is Ana")
    phone.merge(laptop.delta_for(phone.vector))
    assert phone.get("memories", "m1") == "my sister is Ana"
    phone.delete("memories", "m1")
    laptop.merge(phone.delta_for(laptop.vector))
    assert laptop.get("memories", "m1") is None and laptop.items("memories") == {}
    assert not laptop.merge_entries([stale]).changed  # the old write, replayed, changes nothing
    assert laptop.get("memories", "m1") is None


def test_sync_sends_only_what_the_peer_lacks() -> None:
    home = Household(("phone", "laptop"))
    phone, laptop = home["phone"], home["laptop"]
    laptop.merge(phone.delta_for(laptop.vector))
    for i in range(20):
        phone.set("preferences", f"k{i}", i)
    assert len(phone.delta_for(laptop.vector).entries) == 20
    laptop.merge(phone.delta_for(laptop.vector))
    assert phone.delta_for(laptop.vector).entries == ()
    phone.set("preferences", "k3", "changed")
    assert [e.key for e in phone.delta_for(laptop.vector).entries] == ["k3"]


def test_entries_from_an_origin_not_yet_known_come_again() -> None:
    home = Household(("phone", "laptop"))
    stranger_home = Household(("other",))
    other = stranger_home["other"]
    other.set("consents", "x", True)
    phone = home["phone"]
    result = phone.merge(other.delta_for({}))
    assert result.refused == {"unknown_origin": 2} and other.node not in phone.vector


def test_malformed_entries_are_rejected() -> None:
    home = Household(("phone",))
    good = home["phone"].set("consents", "federated_training", True).to_dict()
    for broken in ({**good, "t": "yesterday"}, {**good, "d": True}, {**good, "d": "no"},
                   {**good, "s": 5}, {k: v for k, v in good.items() if k != "s"},
                   {"c": "consents"}):
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
    with pytest.raises(ClockDriftError):
        clock.check(HLC(now[0] + 3_600_000, 0, "liar"))
    assert HLC.decode(first.encode()) == first
