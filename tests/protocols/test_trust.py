"""Who may write a user's state, tested as the revoked device: it reaches a pod that has
not heard of its revocation and tries to undo it, certify a key of its own, write in
other devices' names, revoke the device that revoked it. Whatever the order the pod
receives things in, the revocation stands, nothing of the attacker's counts once the
revocation is there, and the attacker is refused from then on."""

from __future__ import annotations

import base64
import random
from dataclasses import replace

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from covey.protocols._crdt import Entry, Replica
from covey.protocols._hlc import HLC
from covey.protocols._identity import UserKey, b64, device_id_of
from covey.protocols._trust import USER_SCHEMA, user_trust
from tests.protocols.household import Household, public

NAMES = ("phone", "laptop", "speaker")


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
