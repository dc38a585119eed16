"""Who may write a user's replicated state: the user key chain, the devices, the
revocations; and the schema of what a user's pods share.

:class:`UserTrust` is derived, as a pure function, from the replica's trust collections
(``devices``: device certificates; ``revocations``; ``kept_entries``: what revocations
keep) and the user id the pod holds (its anchor):

- *The key chain.* The first user key K0 signs the *genesis* certificate: the one whose
  user id is ``user_id_of(K0, its device key)``, the anchor (nobody can make another).
  Each revocation is signed by the key it retires (``previous_key``) and names the next
  (``next_key``); the revocations reachable from K0 form a tree of keys, and a key's
  *depth* is its distance from K0. The chain follows, at each key, an *eligible*
  revocation: one written by a device not itself revoked at that depth or before; among
  several (two pods revoked two devices at once) the earliest (timestamp, then
  signature). The end of the chain, the *head*, is the current user key. If revocations
  exist at a key but none is eligible (two devices revoked each other), the chain stops
  there and ``conflict`` is set.
- *Revoked* devices: every device named by a revocation in the tree. Revocation is final:
  nothing that arrives later removes a revocation or makes it count less.
- *Valid certificates*: signed by a key of the tree for this user, written by a device
  that had a valid certificate at that depth or before (the genesis certificate is the
  base case), was not revoked at an earlier depth and, if revoked at all, whose
  revocations kept the certificate (below). *Current* devices: validly certified by the
  head key and not revoked. Only they may connect.
- *Kept entries*: each revocation names lists (``kept_entries``, content-addressed) of the
  revoked device's entries the revoking pod held when it revoked it, by :func:`entry_id`
  (a hash of everything the entry's signature covers). Of a revoked device's entries,
  only those on the lists of every revocation naming it count: a device sets its own
  timestamps, so nothing it signs can be told apart by time, only by content. The
  intersection only shrinks as revocations arrive, so no pod ever has to take back an
  entry it refused.

:meth:`UserTrust.refusal` adds the rules that depend on what this pod already knows: an
entry from a revoked device that its revocations did not keep is refused, whatever its
timestamp (``unknown_kept`` while a named list has not arrived: it comes again); a
certificate or revocation signed by a key other than the head is refused unless a
current device wrote it (so a revoked device's copy of an old key certifies and revokes
nothing here; an honest pod's statement made while another pod was rotating the key
still counts, and comes again, ``unknown_current``, until the head key's certificate of
its writer is here). :meth:`UserTrust.void` names the entries a pod already holds that
a revocation it just learned of did not keep: the replica drops them.

What a revoked device can still do, and only at a pod it reaches before the revocation
does (every other pod refuses it): have its edits accepted there until the revocation
arrives (then those the revocation did not keep are dropped), certify devices with the
key it holds (they stop counting as soon as the revocation arrives, since the key is no
longer the head and their writer is revoked), and revoke the device that revoked it,
which stops the key chain at that pod (both devices revoked there; a denial of service,
never an un-revocation or a device of its own accepted). Its entries the revoking pod
had not received when it revoked it are lost, genuine ones too: nothing can tell them
from ones made afterwards.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from covey.protocols._crdt import Entry, Replica, Schema, TrustFactory, content_key, grow_only, lww
from covey.protocols._identity import (
    DeviceCertificate,
    Revocation,
    UserKey,
    b64,
    unb64,
    user_id_of,
)

__all__ = ["KEPT", "MAX_KEPT", "TRUST_COLLECTIONS", "USER_SCHEMA", "UserTrust", "entry_id",
           "kept_lists", "revoke", "user_schema", "user_trust"]

TRUST_COLLECTIONS = ("devices", "revocations")  # the statements signed by user keys

#: Collections whose entries only ever add to what the user is charged (the privacy
#: ledger): a revoked device's are kept whatever its revocations list, since counting
#: more spend is never less private. They are still signed by their device.
ADD_ONLY = ("ledger",)
KEPT = "kept_entries"  # the lists of a revoked device's entries that still count
MAX_KEPT = 4096  # entry ids in one kept list: 64 KiB, 87 KB in base64
_ID = 16  # bytes of an entry id


def entry_id(entry: Entry) -> bytes:
    """16 bytes of SHA-256 of what the entry's signature covers (collection, key, value,
    timestamp, tombstone flag): the same entry whoever relays it, and no other."""
    return hashlib.sha256(entry.signed_bytes()).digest()[:_ID]


@functools.lru_cache(maxsize=256)  # the trust is derived again and again from the same lists
def _ids(blob: str) -> frozenset[bytes]:
    raw = unb64(blob)
    return frozenset(raw[i:i + _ID] for i in range(0, len(raw), _ID))


def kept_lists(replica: Replica, device_id: str) -> list[dict[str, str]]:
    """The ``kept_entries`` values listing every entry of ``device_id`` the replica holds
    (sorted ids, at most :data:`MAX_KEPT` a list; none when it holds none)."""
    ids = sorted({entry_id(e) for e in replica.entries.values() if e.origin == device_id})
    return [{"ids": b64(b"".join(ids[i:i + MAX_KEPT]))} for i in range(0, len(ids), MAX_KEPT)]


def revoke(replica: Replica, key: UserKey, device_id: str, reason: str
           ) -> tuple[Revocation, UserKey, list[Entry]]:
    """Revoke ``device_id`` in ``replica`` with ``key`` (the head key): list the device's
    entries the replica holds (they alone count from now on), sign the revocation, and
    certify every other current device again with the new key. The revocation, the new
    key and the entries written, in the order written."""
    trust = replica.trust()
    if not isinstance(trust, UserTrust):
        raise TypeError("the replica's trust is not a user's")
    lists = [replica.add(KEPT, value) for value in kept_lists(replica, device_id)]
    revocation, successor = key.revoke(device_id, reason, " ".join(e.key for e in lists))
    written = [*lists, replica.add("revocations", revocation.to_dict())]
    for other in sorted(trust.current - {device_id}):
        cert = trust.latest(other)
        written.append(replica.add("devices", successor.certify(
            cert.device_key, cert.name).to_dict()))
    return revocation, successor, written


def _statement_key(value: Any) -> str:
    """A certificate's or revocation's key: its device id and 8 bytes of its hash."""
    return f"{value['device_id']}:{content_key(value)[:16]}"


@dataclass(frozen=True)
class _Held:
    """A statement held in the replica, with the entry that carries it."""

    statement: Any  # DeviceCertificate or Revocation
    entry: Entry
    signer: bytes  # the user key that signed it

    @property
    def origin(self) -> str:
        return self.entry.origin


def _parse(entries: Iterable[Entry], kind: type[Any], user_id: str) -> list[_Held]:
    held = []
    for entry in entries:
        try:
            statement = kind.from_dict(entry.value)
            signer = statement.verify()
        except (ValueError, TypeError):
            continue
        if statement.user_id == user_id:
            held.append(_Held(statement, entry, signer))
    return held


def _is_genesis(cert: DeviceCertificate, signer: bytes, user_id: str) -> bool:
    return user_id_of(signer, cert.device_key) == user_id


@dataclass(frozen=True)
class UserTrust:
    """The user's key chain, devices and revocations as one replica holds them."""

    user_id: str
    chain: tuple[bytes, ...] = ()  # user public keys, first to current
    depth: dict[bytes, int] = field(default_factory=dict)  # every key of the tree
    certificates: dict[str, list[_Held]] = field(default_factory=dict)  # valid, by device
    revocations: dict[str, list[_Held]] = field(default_factory=dict)  # in the tree, by device
    current: frozenset[str] = frozenset()
    conflict: bool = False
    # revoked device -> the ids of its entries that count (None: a named list is missing)
    kept: dict[str, frozenset[bytes] | None] = field(default_factory=dict)

    # -- derivation ------------------------------------------------------------------

    @classmethod
    def derive(cls, user_id: str | None, replica: Replica) -> UserTrust:
        """The trust a replica's ``devices`` and ``revocations`` establish for ``user_id``."""
        if not user_id:
            return cls("")
        certs = _parse(replica.entries_of("devices"), DeviceCertificate, user_id)
        revs = _parse(replica.entries_of("revocations"), Revocation, user_id)
        root = next((h.signer for h in certs if _is_genesis(h.statement, h.signer, user_id)),
                    None)
        if root is None:
            return cls(user_id)
        depth, children = cls._tree(root, revs)
        revoked: dict[str, list[_Held]] = {}
        for h in revs:
            if h.signer in depth:
                revoked.setdefault(h.statement.device_id, []).append(h)
        revoked_at = {d: min(depth[h.signer] for h in hs) for d, hs in revoked.items()}
        chain, conflict = cls._chain(root, depth, children, revoked_at)
        kept = {d: cls._kept(hs, replica) for d, hs in revoked.items()}
        trust = cls(user_id, chain, depth, {}, revoked, kept=kept)
        valid = cls._valid_certificates(certs, depth, revoked_at, trust, user_id)
        head = chain[-1]
        # A forked chain (two devices revoked each other) trusts nobody: better that this
        # pod syncs with no one than with whoever revoked first.
        current = frozenset() if conflict else frozenset(
            d for d, hs in valid.items() if d not in revoked and any(h.signer == head for h in hs))
        return cls(user_id, chain, depth, valid, revoked, current, conflict, kept)

    @staticmethod
    def _kept(held: list[_Held], replica: Replica) -> frozenset[bytes] | None:
        """The entries of a revoked device that every revocation naming it kept (None: a
        list one of them names has not arrived). Intersecting makes the set only shrink as
        revocations arrive, so a pod drops what a later one did not keep, and never has to
        take back an entry it refused."""
        kept: frozenset[bytes] | None = None
        for h in held:
            ids: set[bytes] = set()
            for key in h.statement.kept.split():
                listed = replica.entries.get((KEPT, key))
                if listed is None or not isinstance(listed.value, dict):
                    return None
                try:
                    ids |= _ids(str(listed.value["ids"]))
                except (KeyError, ValueError):
                    return None
            kept = frozenset(ids) if kept is None else kept & ids
        return kept

    @staticmethod
    def _tree(root: bytes, revs: list[_Held]) -> tuple[dict[bytes, int], dict[bytes, list[_Held]]]:
        children: dict[bytes, list[_Held]] = {}
        for h in revs:
            children.setdefault(h.signer, []).append(h)
        depth, frontier = {root: 0}, [root]
        while frontier:  # breadth first, each key once (a forged loop back ends here)
            key = frontier.pop(0)
            for h in children.get(key, []):
                nxt = unb64(h.statement.next_key, 32)
                if nxt not in depth:
                    depth[nxt] = depth[key] + 1
                    frontier.append(nxt)
        return depth, children

    @staticmethod
    def _chain(root: bytes, depth: dict[bytes, int], children: dict[bytes, list[_Held]],
               revoked_at: dict[str, int]) -> tuple[tuple[bytes, ...], bool]:
        chain, key = [root], root
        while True:
            here = children.get(key, [])
            eligible = [h for h in here if revoked_at.get(h.origin, math.inf) > depth[key]]
            if not eligible:
                return tuple(chain), bool(here)
            step = min(eligible, key=lambda h: (h.entry.stamp, h.statement.signature))
            key = unb64(step.statement.next_key, 32)
            if key in chain or depth.get(key) != len(chain):
                return tuple(chain), True
            chain.append(key)

    @staticmethod
    def _valid_certificates(certs: list[_Held], depth: dict[bytes, int],
                            revoked_at: dict[str, int], trust: UserTrust,
                            user_id: str) -> dict[str, list[_Held]]:
        """The least fixpoint: a certificate counts if its writer counted at its depth or
        before (or it is the genesis certificate) and had not been revoked when it wrote
        it: not at an earlier key, and (a revoked writer) the revocations kept it."""
        pending = [h for h in certs if h.signer in depth]
        valid: dict[str, list[_Held]] = {}
        since: dict[str, float] = {}  # device -> smallest depth of a valid certificate
        changed = True
        while changed:
            changed = False
            for h in list(pending):
                at, origin = depth[h.signer], h.origin
                if revoked_at.get(origin, math.inf) < at or trust.admits(h.entry) is not True:
                    continue
                genesis = at == 0 and origin == h.statement.device_id and \
                    _is_genesis(h.statement, h.signer, user_id)
                if genesis or since.get(origin, math.inf) <= at:
                    device = h.statement.device_id
                    valid.setdefault(device, []).append(h)
                    since[device] = min(since.get(device, math.inf), at)
                    pending.remove(h)
                    changed = True
        return valid

    # -- reading ---------------------------------------------------------------------

    @property
    def head(self) -> bytes | None:
        """The current user public key (None before the genesis certificate is held)."""
        return self.chain[-1] if self.chain else None

    def device_key(self, device_id: str) -> bytes | None:
        """The public key of a validly certified device (revoked or not)."""
        held = self.certificates.get(device_id)
        return held[0].statement.device_key if held else None

    def certificate(self, device_id: str) -> DeviceCertificate | None:
        """The device's latest valid certificate (None: it has none)."""
        return self.latest(device_id) if device_id in self.certificates else None

    def latest(self, device_id: str) -> DeviceCertificate:
        """The latest valid certificate of a certified device (raises KeyError)."""
        statement: DeviceCertificate = max(self.certificates[device_id],
                                           key=lambda h: self.depth[h.signer]).statement
        return statement

    def revocation(self, device_id: str) -> Revocation | None:
        """The device's first revocation, if it was revoked."""
        held = self.revocations.get(device_id)
        return min(held, key=lambda h: h.entry.stamp).statement if held else None

    def admits(self, entry: Entry) -> bool | None:
        """Whether ``entry`` counts as its writer's: always, unless the writer was revoked;
        then only if every revocation of it kept the entry (None: not known yet). Entries
        of an :data:`ADD_ONLY` collection always count: they can only add to what the
        user is charged, and dropping a revoked device's genuine spend would undercount."""
        if entry.origin not in self.revocations or entry.collection in ADD_ONLY:
            return True
        kept = self.kept.get(entry.origin)
        return None if kept is None else entry_id(entry) in kept

    # -- the Trust protocol ----------------------------------------------------------

    def origin_key(self, entry: Entry) -> bytes | None:
        """The origin's device key; a genesis certificate introduces its own writer."""
        key = self.device_key(entry.origin)
        if key is not None or entry.collection != "devices":
            return key
        try:
            cert = DeviceCertificate.from_dict(entry.value)
            signer = cert.verify()
        except (ValueError, TypeError):
            return None
        if cert.device_id == entry.origin and cert.user_id == self.user_id and \
                _is_genesis(cert, signer, self.user_id):
            return cert.device_key
        return None

    def refusal(self, entry: Entry) -> str | None:
        """A revoked device's entries its revocations did not keep (``unknown_kept`` while
        a list they name is missing: they come again), statements signed by a key this pod
        does not know yet (``unknown_key``: they come again), and old-key statements by
        non-current writers (``unknown_current`` when the writer was not revoked: it may
        be certified by the head key later, and its statement comes again)."""
        admitted = self.admits(entry)
        if admitted is None:
            return "unknown_kept"
        if not admitted:
            return "revoked_origin"
        signer = _signer(entry)
        if signer is not None and signer not in self.depth and not (
                entry.collection == "devices" and self.head is None):
            return "unknown_key"
        if entry.collection in TRUST_COLLECTIONS and self.head is not None \
                and entry.origin not in self.current and isinstance(entry.value, dict):
            field = "signer" if entry.collection == "devices" else "previous_key"
            if entry.value.get(field) != b64(self.head):
                # A revoked writer never becomes current again; another may, once the
                # head key's certificate of it is here (then it comes again).
                return "superseded_key" if entry.origin in self.revocations \
                    else "unknown_current"
        return None

    def may_sync(self, node: str) -> bool:
        """Only current devices (certified by the head key, not revoked) may sync."""
        return node in self.current

    def void(self, entry: Entry) -> bool:
        """Whether a held entry must go: a revoked device's entry that its revocations did
        not keep. Its revocations and kept lists stay (they are the key chain: removing
        them would change which revocations count)."""
        return entry.collection not in ("revocations", KEPT) and self.admits(entry) is False


def _verify_certificate(entry: Entry, trust: UserTrust, current: Entry | None) -> None:
    cert = DeviceCertificate.from_dict(entry.value)
    cert.verify()
    if cert.user_id != trust.user_id:
        raise ValueError("a certificate for another user")


def _verify_revocation(entry: Entry, trust: UserTrust, current: Entry | None) -> None:
    revocation = Revocation.from_dict(entry.value)
    revocation.verify()
    if revocation.user_id != trust.user_id:
        raise ValueError("a revocation for another user")


def _verify_kept(entry: Entry, trust: UserTrust, current: Entry | None) -> None:
    """A kept list: ``{"ids": base64}`` of 1 to MAX_KEPT entry ids, sorted, no repeats."""
    value = entry.value
    if not isinstance(value, dict) or set(value) != {"ids"} or not isinstance(value["ids"], str):
        raise ValueError("a kept list is {'ids': base64}")
    raw = unb64(value["ids"])
    if not raw or len(raw) % _ID or len(raw) > _ID * MAX_KEPT:
        raise ValueError(f"a kept list holds 1 to {MAX_KEPT} ids of {_ID} bytes")
    ids = [raw[i:i + _ID] for i in range(0, len(raw), _ID)]
    if any(a >= b for a, b in itertools.pairwise(ids)):
        raise ValueError("a kept list is sorted, without repeats")


def _signer(entry: Entry) -> bytes | None:
    """The user key a certificate or revocation says signed it (None: not one)."""
    field = {"devices": "signer", "revocations": "previous_key"}.get(entry.collection)
    if field is None or not isinstance(entry.value, dict):
        return None
    try:
        return unb64(str(entry.value.get(field, "")), 32)
    except ValueError:
        return None


def user_schema(*extra: Any) -> Schema:
    """What a user's pods share; ``extra`` collections (or replacements, by name) added.

    Adding a collection is one line: ``user_schema(grow_only("ledger", verify=check_row))``.
    """
    replaced = {c.name for c in extra}
    return Schema([*(c for c in USER_SCHEMA if c.name not in replaced), *extra])


#: The collections a user's pods share. ``memories`` only where the user opts in.
USER_SCHEMA = Schema([
    lww("profile"), lww("preferences"), lww("consents"), lww("budget_policy"),
    grow_only("devices", verify=_verify_certificate, key_of=_statement_key, trust=True),
    grow_only("revocations", verify=_verify_revocation, key_of=_statement_key, trust=True),
    grow_only(KEPT, verify=_verify_kept, trust=True),
    lww("memories"),
])


def user_trust(user_id: str | None) -> TrustFactory:
    """The trust factory for a replica of ``user_id``'s state (None: trusts nothing)."""
    return lambda replica: UserTrust.derive(user_id, replica)
