"""Who may write a user's replicated state: the user key chain, the devices, the
revocations; and the schema of what a user's pods share.

:class:`UserTrust` is derived, as a pure function, from the replica's two trust
collections (``devices``: device certificates; ``revocations``) and the user id the pod
holds (its anchor):

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
  base case) and was not revoked at that depth or before. *Current* devices: validly
  certified by the head key and not revoked. Only they may connect.

:meth:`UserTrust.refusal` adds the rules that depend on what this pod already knows: an
entry from a revoked device is refused when stamped after the revocation's cutoff (the
revoking pod's last timestamp from that device), and a certificate or revocation signed
by a key other than the head is refused unless a current device wrote it (so a revoked
device's copy of an old key certifies and revokes nothing here; an honest pod's statement
made while another pod was rotating the key still counts).

What a revoked device can still do, and only at a pod it reaches before the revocation
does (every other pod refuses it): have its edits accepted there, certify devices with
the key it holds (they stop counting as soon as the revocation arrives, since the key is
no longer the head and their writer is revoked), and revoke the device that revoked it,
which stops the key chain at that pod (both devices revoked there; a denial of service,
never an un-revocation or a device of its own accepted).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from covey.protocols._crdt import Entry, Replica, Schema, TrustFactory, content_key, grow_only, lww
from covey.protocols._hlc import HLC
from covey.protocols._identity import DeviceCertificate, Revocation, b64, unb64, user_id_of

__all__ = ["TRUST_COLLECTIONS", "USER_SCHEMA", "UserTrust", "user_schema", "user_trust"]

TRUST_COLLECTIONS = ("devices", "revocations")


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
        trust = cls(user_id, chain, depth, {}, revoked)
        cutoffs = {d: trust.cutoff(d) for d in revoked}
        valid = cls._valid_certificates(certs, depth, revoked_at, cutoffs, user_id)
        head = chain[-1]
        # A forked chain (two devices revoked each other) trusts nobody: better that this
        # pod syncs with no one than with whoever revoked first.
        current = frozenset() if conflict else frozenset(
            d for d, hs in valid.items() if d not in revoked and any(h.signer == head for h in hs))
        return cls(user_id, chain, depth, valid, revoked, current, conflict)

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
                            revoked_at: dict[str, int], cutoffs: dict[str, HLC | None],
                            user_id: str) -> dict[str, list[_Held]]:
        """The least fixpoint: a certificate counts if its writer counted at its depth or
        before (or it is the genesis certificate) and had not been revoked when it wrote
        it: not at an earlier key, nor at the same key after the revocation's cutoff."""
        pending = [h for h in certs if h.signer in depth]
        valid: dict[str, list[_Held]] = {}
        since: dict[str, float] = {}  # device -> smallest depth of a valid certificate
        changed = True
        while changed:
            changed = False
            for h in list(pending):
                at, origin = depth[h.signer], h.origin
                revoked, cutoff = revoked_at.get(origin, math.inf), cutoffs.get(origin)
                if revoked < at or (revoked == at and (cutoff is None
                                                       or h.entry.stamp > cutoff)):
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

    def cutoff(self, device_id: str) -> HLC | None:
        """Writes of a revoked device stamped after this are void (None: not revoked)."""
        held = self.revocations.get(device_id)
        if not held:
            return None
        stamps = []
        for h in held:
            try:
                seen = HLC.decode(h.statement.seen) if h.statement.seen else None
            except ValueError:
                seen = None
            stamps.append(seen if seen is not None and seen.node == device_id
                          else HLC(0, 0, device_id))
        return min(stamps)

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
        """A revoked device's later writes, statements signed by a key this pod does not
        know yet (``unknown_key``: they come again), and old-key statements by non-current
        writers."""
        cutoff = self.cutoff(entry.origin)
        if cutoff is not None and entry.stamp > cutoff:
            return "revoked_origin"
        signer = _signer(entry)
        if signer is not None and signer not in self.depth and not (
                entry.collection == "devices" and self.head is None):
            return "unknown_key"
        if entry.collection in TRUST_COLLECTIONS and self.head is not None \
                and entry.origin not in self.current and isinstance(entry.value, dict):
            field = "signer" if entry.collection == "devices" else "previous_key"
            if entry.value.get(field) != b64(self.head):
                return "superseded_key"
        return None

    def may_sync(self, node: str) -> bool:
        """Only current devices (certified by the head key, not revoked) may sync."""
        return node in self.current


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
    lww("memories"),
])


def user_trust(user_id: str | None) -> TrustFactory:
    """The trust factory for a replica of ``user_id``'s state (None: trusts nothing)."""
    return lambda replica: UserTrust.derive(user_id, replica)
