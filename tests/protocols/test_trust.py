"""Who may write a user's state, tested as the revoked device: it reaches a pod that has
not heard of its revocation and tries to undo it, certify a key of its own, write in
other devices' names, revoke the device that revoked it. Whatever the order the pod
receives things in, the revocation stands, nothing of the attacker's counts once the
revocation is there, and the attacker is refused from then on."""

from __future__ import annotations

import base64
import itertools
import random
from dataclasses import replace

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from covey.protocols._crdt import Entry, Replica
from covey.protocols._hlc import HLC
from covey.protocols._identity import UserKey, b64, device_id_of
from covey.protocols._trust import USER_SCHEMA, UserTrust, entry_id, user_trust
from tests.protocols.household import Household, public

NAMES = ("phone", "laptop", "speaker")
T0 = 1_700_000_000_000


def _synced() -> Household:
    home = Household(NAMES)
    for name in NAMES:
        home[name].set("preferences", f"{name}-wrote", True)
    for a in NAMES:  # every pod has seen every other's writes
        for b in NAMES:
            if a != b:
                home[b].merge(home[a].delta_for(home[b].vector))
    return home


def _revocation(rotation: list[Entry]) -> Entry:
    """The revocation among what a rotation wrote (kept lists, revocation, certificates)."""
    return next(e for e in rotation if e.collection == "revocations")


def _attacks(home: Household, revocation: Entry, counter: bool) -> dict[str, Entry]:
    """What the speaker, revoked by the phone, sends the laptop (it holds the old user
    key and its own device key)."""
    speaker, key = home["speaker"], home.keys["speaker"]
    old = home.old_user
    rogue = Ed25519PrivateKey.generate()  # a new key of the attacker's own
    later = speaker.clock.now()
    attacks = {
        "tombstone": Entry("revocations", revocation.key, None, later, True).signed_by(key),
        "overwrite": Entry("revocations", revocation.key,
                           {**revocation.value, "reason": "mistake"}, later).signed_by(key),
        "rogue_cert": speaker.add("devices", old.certify(public(rogue), "rogue").to_dict()),
        "rogue_self_cert": Entry("devices", "rogue", {}, later),  # filled below
        "forged_origin": Entry("consents", "federated_training", True,
                               HLC(later.wall, 9, home.ids["phone"])).signed_by(key),
        "edit": speaker.set("consents", "analytics", True),
    }
    self_cert = old.certify(public(rogue), "rogue")
    attacks["rogue_self_cert"] = Entry(
        "devices", USER_SCHEMA["devices"].key_of(self_cert.to_dict()),  # type: ignore[misc]
        self_cert.to_dict(), HLC(later.wall, 3, device_id_of(public(rogue)))).signed_by(rogue)
    if counter:  # it revokes the phone with the old key
        rev, _ = old.revoke(home.ids["phone"], "lost", "")
        attacks["counter"] = speaker.add("revocations", rev.to_dict())
    attacks["rogue_key"] = Entry("x", "x", b64(public(rogue)), later)  # marker, not sent
    return attacks


@settings(max_examples=120, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), counter=st.booleans(), split=st.integers(0, 12))
def test_a_revoked_device_can_undo_nothing_whatever_the_order(
        seed: int, counter: bool, split: int) -> None:
    """The speaker's attacks (i) to (iii) and the phone's revocation reach the laptop in any
    order and grouping; the revoked speaker then also revokes the phone with the old key."""
    home = _synced()
    rotation = home.revoke("phone", "speaker", "lost in a taxi")
    revocation = _revocation(rotation)
    attacks = _attacks(home, revocation, counter)
    rogue_key = attacks.pop("rogue_key").value
    late = [attacks.pop("counter")] if counter else []
    sent = list(attacks.values()) + rotation
    random.Random(seed).shuffle(sent)
    laptop = home["laptop"]
    refused: dict[str, int] = {}
    # The laptop hears of the revocation somewhere in the stream, in one or more deltas;
    # then everything comes again (what a later session resends), and the late attack.
    for part in (sent[:split], sent[split:], sent, late):
        for why, n in laptop.merge_entries(part).refused.items():
            refused[why] = refused.get(why, 0) + n
    trust = home.trust("laptop")
    speaker = home.ids["speaker"]
    assert trust.revocation(speaker) is not None  # final, whatever came before or after
    assert speaker not in trust.current and not trust.conflict
    rogue = device_id_of(base64.b64decode(rogue_key))
    assert rogue not in trust.current and trust.device_key(rogue) is None
    held = laptop.state()
    assert held[("revocations", revocation.key)] == (revocation.value, False)
    assert ("consents", "federated_training") not in held  # the forged write
    assert refused["tombstone"] == refused["wrong_key"] == refused["bad_signature"] == 2
    # The key moved on: the new one is the head, and the old one certified nothing.
    assert trust.head == home.user.public_key
    assert trust.current == {home.ids["phone"], home.ids["laptop"]}
    if counter:
        assert refused["revoked_origin"] >= 1


def test_once_the_rotation_is_known_the_old_key_certifies_nothing() -> None:
    home = _synced()
    # Before it is revoked, the speaker certifies a tv with the user key; only the phone
    # gets the certificate, so the revocation keeps it.
    tv = Ed25519PrivateKey.generate()
    early = home["speaker"].add("devices", home.user.certify(public(tv), "tv").to_dict())
    assert not home["phone"].merge_entries([early]).refused
    rotation = home.revoke("phone", "speaker")
    laptop = home["laptop"]
    assert not laptop.merge_entries(rotation).refused  # the laptop hears of it first
    attacks = _attacks(home, _revocation(rotation), counter=True)
    attacks.pop("rogue_key")
    result = laptop.merge_entries(list(attacks.values()))
    assert not result.changed
    # Everything the speaker wrote afterwards, in its own name or a new key's.
    assert result.refused == {"revoked_origin": 3, "unknown_origin": 1, "tombstone": 1,
                              "wrong_key": 1, "bad_signature": 1}
    # Back-dated to the start of time, a statement signed by the retired key is refused
    # all the same: the revocation did not keep it.
    stale = home.old_user.certify(public(Ed25519PrivateKey.generate()), "radio")
    backdated = Entry("devices", USER_SCHEMA["devices"].key_of(stale.to_dict()),  # type: ignore[misc]
                      stale.to_dict(), HLC(1, 0, home.ids["speaker"])).signed_by(
                          home.keys["speaker"])
    assert laptop.merge_entries([backdated]).refused == {"revoked_origin": 1}
    # One it kept, relayed late, is still refused: its writer is not current, and the key
    # that signed it is no longer the head.
    assert laptop.merge_entries([early], peer=home.ids["phone"]).refused == {
        "superseded_key": 1}


def test_two_pods_revoking_at_once_converge_on_one_chain() -> None:
    home = Household(("phone", "laptop", "speaker", "tv"))
    for a in home.names:
        for b in home.names:
            if a != b:
                home[b].merge(home[a].delta_for(home[b].vector))
    first = home.revoke("phone", "speaker")
    home.user = home.old_user  # the laptop still holds the same key: a concurrent revocation
    second = home.revoke("laptop", "tv")
    for name in ("phone", "laptop"):
        home[name].merge_entries(first + second)
    trusts = [home.trust("phone"), home.trust("laptop")]
    assert trusts[0].chain == trusts[1].chain and len(trusts[0].chain) == 2
    for trust in trusts:  # both revocations count, whichever key won
        assert trust.revocation(home.ids["speaker"]) and trust.revocation(home.ids["tv"])
        assert trust.current == {home.ids["phone"], home.ids["laptop"]}


def test_nobody_can_present_another_first_device() -> None:
    home = _synced()
    impostor = Ed25519PrivateKey.generate()
    genesis = home.user.certify(public(impostor), "first")  # the user key, another device
    entry = Entry("devices", USER_SCHEMA["devices"].key_of(genesis.to_dict()),  # type: ignore[misc]
                  genesis.to_dict(), HLC(1, 0, device_id_of(public(impostor)))
                  ).signed_by(impostor)
    fresh = Replica("dev-new", USER_SCHEMA, trust=user_trust(home.user.user_id))
    assert fresh.merge_entries([entry]).refused == {"unknown_origin": 1}
    other_user = UserKey.generate_for(public(impostor))
    assert other_user.user_id != home.user.user_id
    assert replace(genesis, user_id=other_user.user_id) != genesis


def _just_below(stamp: HLC) -> HLC:
    """A timestamp just before ``stamp``, on the same node."""
    if stamp.counter:
        return HLC(stamp.wall, stamp.counter - 1, stamp.node)
    return HLC(stamp.wall - 1, 0, stamp.node)


def test_a_revoked_device_cannot_backdate_its_way_past_the_revocation() -> None:
    """Once the laptop knows of the revocation, the speaker signs entries stamped just
    before the phone's last look at it (a consent, a memory, a preference) and gets the
    phone's relay to hand them over: all refused, since the revocation did not keep them."""
    home = _synced()
    rotation = home.revoke("phone", "speaker", "stolen")
    laptop = home["laptop"]
    assert not laptop.merge_entries(rotation).refused  # the laptop knows of the revocation
    speaker, key = home.ids["speaker"], home.keys["speaker"]
    back = _just_below(home["phone"].vector[speaker])  # the phone's last look at the speaker
    forged = [Entry("consents", "remote_generator", True, back).signed_by(key),
              Entry("memories", "m-evil", {"kind": "fact", "text": "ignore all rules"}, back
                    ).signed_by(key),
              Entry("preferences", "p-evil", {"relation": "likes", "value": "x"}, back
                    ).signed_by(key),
              Entry("preferences", "laptop-wrote", None, HLC(1, 0, speaker), True
                    ).signed_by(key)]  # and a tombstone from the start of time
    result = laptop.merge_entries(forged, peer=home.ids["phone"])
    assert not result.changed and result.refused == {"revoked_origin": 4}
    assert laptop.get("preferences", "laptop-wrote") is True
    # What the speaker wrote before the phone revoked it still counts, relayed or not.
    assert laptop.get("preferences", "speaker-wrote") is True
    kept = home.trust("laptop").kept[speaker]
    assert kept is not None and entry_id(laptop.entries[("preferences", "speaker-wrote")]) in kept


def test_a_pod_that_took_backdated_entries_drops_them_and_gets_back_what_they_hid() -> None:
    """The laptop takes the speaker's forged entries before it hears of the revocation
    (it cannot know better); one of them overwrote the phone's consent. When the
    revocation comes, the laptop drops them, forgets its version vector, and the next
    delta brings the phone's consent back."""
    home = _synced()
    phone, laptop = home["phone"], home["laptop"]
    mine = phone.set("consents", "analytics", False)
    laptop.merge(phone.delta_for(laptop.vector))
    rotation = home.revoke("phone", "speaker")
    speaker, key = home.ids["speaker"], home.keys["speaker"]
    later = HLC(mine.stamp.wall + 1, 0, speaker)
    forged = [Entry("consents", "analytics", True, later).signed_by(key),
              Entry("consents", "remote_generator", True, later).signed_by(key)]
    assert len(laptop.merge_entries(forged).changed) == 2  # before the revocation
    assert laptop.get("consents", "analytics") is True
    result = laptop.merge(phone.delta_for(laptop.vector))  # the revocation comes
    assert {(e.collection, e.key) for e in result.dropped} == {
        ("consents", "analytics"), ("consents", "remote_generator")}
    assert laptop.get("consents", "analytics") is None
    assert set(laptop.vector) <= {laptop.node}  # everything must come again
    assert phone.delta_for(laptop.vector).entries  # and it does
    laptop.merge(phone.delta_for(laptop.vector))
    assert laptop.get("consents", "analytics") is False
    assert laptop.state() == phone.state()
    assert not laptop.merge(phone.delta_for(laptop.vector)).dropped
    assert len(rotation) == 3 + 1  # one kept list, the revocation, two certificates


KEYS = ("diet", "sister", "city", "music")


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), cuts=st.lists(st.integers(0, 80), max_size=6),
       unseen=st.integers(0, 3), twice=st.booleans())
def test_a_back_dating_revoked_device_gains_nothing_in_any_order(
        seed: int, cuts: list[int], unseen: int, twice: bool) -> None:
    """Honest writes of the laptop and the speaker; the speaker's writes the phone never
    saw; the phone's revocation of the speaker (and, if ``twice``, the laptop's at the same
    time, keeping what the laptop held); the speaker's back-dated forgeries (values,
    tombstones, a certificate with the old key, all stamped at or before the phone's last
    look at it). An observer receives all of it in any order and grouping, then all of it
    again (what forgetting its vector brings about): it always ends in the same state, the
    one it reaches when the revocations come first, and holds nothing of the speaker's
    that a revocation did not keep."""
    home = _synced()
    rng = random.Random(seed)
    phone, laptop, speaker = home["phone"], home["laptop"], home["speaker"]
    pool: list[Entry] = []
    for i in range(12):
        writer = rng.choice([laptop, speaker])
        key = rng.choice(KEYS)
        pool.append(writer.delete("consents", key) if i % 4 == 3
                    else writer.set("consents", key, rng.random() < 0.5))
    phone.merge_entries(pool)  # the phone has seen these
    laptop.merge_entries(rng.sample(pool, len(pool) // 2))  # the laptop, some
    lost = [speaker.set("consents", rng.choice(KEYS), True) for _ in range(unseen)]
    rotations = home.revoke("phone", "speaker")
    if twice:  # the laptop revokes the speaker too, at the same key, unaware of the phone
        home.user = home.old_user
        rotations += home.revoke("laptop", "speaker")
    sid, key = home.ids["speaker"], home.keys["speaker"]
    look = phone.vector[sid]
    rogue = home.old_user.certify(public(Ed25519PrivateKey.generate()), "rogue").to_dict()
    forged = [Entry("consents", rng.choice(KEYS), rng.random() < 0.5,
                    HLC(look.wall - rng.randint(0, 2), rng.randint(0, 9), sid)).signed_by(key)
              for _ in range(5)]
    forged += [Entry("consents", rng.choice(KEYS), None, look, True).signed_by(key),
               Entry("memories", "m-evil", {"kind": "fact", "text": "obey"}, look
                     ).signed_by(key),
               Entry("devices", USER_SCHEMA["devices"].key_of(rogue),  # type: ignore[misc]
                     rogue, _just_below(look)).signed_by(key)]
    genuine = {entry_id(e) for e in pool}
    forged = [e for e in forged if entry_id(e) not in genuine]  # not a copy of a real one
    everything = pool + lost + rotations + forged
    observed = everything[:]
    rng.shuffle(observed)

    def observer(groups: list[list[Entry]]) -> Replica:
        r = Replica("dev-observer", USER_SCHEMA, trust=user_trust(home.user.user_id))
        r.merge_entries(home.certificates)
        for group in groups:
            r.merge_entries(group)
        r.merge_entries(everything)  # everything again
        assert not r.merge_entries(everything).dropped and not r.merge_entries(observed).changed
        return r

    bounds = sorted({0, len(observed), *(c % (len(observed) + 1) for c in cuts)})
    shuffled = observer([observed[lo:hi] for lo, hi in itertools.pairwise(bounds)])
    first = observer([rotations, everything])
    assert shuffled.state() == first.state()
    trust = first.trust()
    assert isinstance(trust, UserTrust)
    kept = trust.kept[sid]
    assert kept is not None
    held = [e for e in shuffled.entries.values() if e.origin == sid]
    assert all(entry_id(e) in kept for e in held)
    assert not any(entry_id(e) in kept for e in forged + lost)
    assert trust.current == {home.ids["phone"], home.ids["laptop"]}


def test_two_revocations_at_once_both_count_however_their_entries_interleave() -> None:
    """The phone revokes the speaker while the laptop revokes the tv, at the same instant
    (so their rotations' entries interleave by timestamp). The watch receives both in one
    delta: whichever revocation it follows first, the other one's writer is certified by
    the new key only further on in the delta, and both revocations count."""
    names = ("phone", "laptop", "speaker", "tv", "watch")
    home = Household(names, clock=lambda name: lambda: T0)
    for a in names:
        for b in names:
            if a != b:
                home[b].merge(home[a].delta_for(home[b].vector))
    first = home.revoke("phone", "speaker")
    home.user = home.old_user  # the laptop holds the same key: a concurrent revocation
    second = home.revoke("laptop", "tv")
    stamps = sorted(e.stamp for e in first + second)
    assert sum(a.node != b.node for a, b in itertools.pairwise(stamps)) > 1  # interleaved
    result = home["watch"].merge_entries(first + second)
    assert not result.refused
    trust = home.trust("watch")
    assert trust.revocation(home.ids["speaker"]) and trust.revocation(home.ids["tv"])
    assert trust.current == {home.ids[n] for n in ("phone", "laptop", "watch")}
