"""The replicated state of one user's pods: signed entries, merged by per-collection rules.

Every piece of shared state is an *entry* ``(collection, key)`` holding a JSON value or a
tombstone, stamped with the hybrid logical timestamp of its write. The timestamp's node
is the device that wrote it (the entry's *origin*), and the entry is signed by that
device's key, so it can be relayed by any pod and still be checked by every receiver.

A :class:`Schema` names the collections and how each merges:

- *last-writer-wins* (:func:`lww`): per key, the entry with the larger timestamp wins; a
  delete is a tombstone, so an older write that arrives later cannot bring it back;
- *grow-only* (:func:`grow_only`): an entry, once written, is never overwritten or
  deleted. Its key is a function of its value (content-addressed), so no two replicas can
  ever hold different values under one key, and merging is a set union.

A received entry is merged only when (1) its collection is in the schema, (2) the
replica's :class:`Trust` knows its origin and the signature verifies by that device's
key, (3) the trust has no objection (the origin was revoked, and its revocation did not
keep the entry, say), (4) a grow-only entry is not a tombstone or an overwrite and sits
under its own key, and (5) the collection's ``verify`` function accepts it. Otherwise it
is *refused*: counted by reason in the :class:`MergeResult`, never stored. Collections
marked ``trust`` (the ones that say who may write: devices, revocations, what
revocations keep) are merged first, in timestamp order, and the trust is recomputed
after each one that changes (the refused ones are tried again while one more gets in),
so a delta may carry a new device's certificate and that device's entries together.

For a fixed trust, merge is commutative, associative and idempotent (tests/protocols/
test_crdt.py checks this with Hypothesis, adversarial entries included): replicas that
received the same entries hold the same state whatever the order, repetition or grouping.
When a merge brings a revocation, the entries the trust now voids (:meth:`Trust.void`)
are dropped, and the replica forgets its version vector so that whatever they had
overwritten comes again: once everything has come again, the state is the same as if
the revocation had come first (tests/protocols/test_trust.py checks this with
Hypothesis, a back-dating revoked device included).

Sync is incremental. Each replica keeps a version vector: per origin, the largest
timestamp it has merged from that origin. A delta for a peer holds every entry newer than
the peer's vector says for its origin; after merging a whole delta the receiver takes the
sender's vector too (entries the sender no longer holds were overwritten by ones it does
hold), except for origins it could not yet check (their entries come again next time),
and not at all after a merge that dropped entries.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from covey.protocols._hlc import HLC, HybridClock
from covey.protocols._identity import b64, canonical, verify_signature

__all__ = ["Collection", "Delta", "Entry", "MergeResult", "Refused", "Replica", "Schema",
           "Trust", "TrustFactory", "content_key", "grow_only", "lww"]

ENTRY_CONTEXT = "covey-entry/2"
_FIELDS = {"c", "k", "v", "t", "d", "s"}


@dataclass(frozen=True)
class Entry:
    """One replicated value (``deleted``: a tombstone, ``value`` is None), signed by its
    origin device (the node of ``stamp``)."""

    collection: str
    key: str
    value: Any
    stamp: HLC
    deleted: bool = False
    signature: str = ""  # base64 Ed25519 of signed_bytes() by the origin device's key

    @property
    def origin(self) -> str:
        """The device that wrote the entry."""
        return self.stamp.node

    def signed_bytes(self) -> bytes:
        """What the origin signs: every field, in canonical JSON."""
        return canonical([ENTRY_CONTEXT, self.collection, self.key, self.value,
                          self.stamp.encode(), self.deleted])

    def signed_by(self, device_key: Ed25519PrivateKey) -> Entry:
        """This entry with the origin device's signature."""
        return replace(self, signature=b64(device_key.sign(self.signed_bytes())))

    def to_dict(self) -> dict[str, Any]:
        return {"c": self.collection, "k": self.key, "v": self.value,
                "t": self.stamp.encode(), "d": self.deleted, "s": self.signature}

    @classmethod
    def from_dict(cls, d: Any) -> Entry:
        """Parse a received entry (raises ValueError, KeyError or TypeError). Whether it
        may be merged is for the receiving replica to decide."""
        if not isinstance(d, Mapping) or set(d) != _FIELDS:
            raise ValueError("an entry has exactly the fields c, k, v, t, d, s")
        collection, key, signature, deleted = d["c"], d["k"], d["s"], d["d"]
        if not all(isinstance(x, str) for x in (collection, key, signature)):
            raise TypeError("an entry's collection, key and signature are strings")
        if not isinstance(deleted, bool) or (deleted and d["v"] is not None):
            raise ValueError("a tombstone carries no value")
        json.dumps(d["v"])  # must be plain JSON
        return cls(collection, key, d["v"], HLC.decode(str(d["t"])), deleted, signature)


def content_key(value: Any) -> str:
    """The key of a grow-only value: 16 bytes of SHA-256 of its canonical JSON, in hex."""
    return hashlib.sha256(canonical(value)).hexdigest()[:32]


class Trust(Protocol):
    """Who may write what: derived from the replica's own ``trust`` collections."""

    def origin_key(self, entry: Entry) -> bytes | None:
        """The public key of the device ``entry`` comes from (None: not a known device)."""

    def refusal(self, entry: Entry) -> str | None:
        """Why ``entry``'s origin may not write it (None: it may). A reason starting with
        ``unknown_`` means "not checkable yet": the sender sends it again later."""

    def may_sync(self, node: str) -> bool:
        """Whether device ``node`` may send entries at all."""

    def void(self, entry: Entry) -> bool:
        """Whether a held entry no longer counts (its writer was revoked since, and the
        revocation did not keep it): the replica drops it."""


class Refused(ValueError):
    """Raised by a collection's verify function to refuse an entry under a reason of its
    own (counted under ``reason``; a plain ValueError counts as "invalid")."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(message or reason)
        self.reason = reason


#: Builds the trust from a replica's current state.
TrustFactory = Callable[["Replica"], Trust]
#: A collection's own check of a received entry: ``verify(entry, trust, current)``, where
#: ``current`` is the entry held under the same key (or None); raises ValueError to refuse.
Verify = Callable[[Entry, Any, "Entry | None"], None]


@dataclass(frozen=True)
class Collection:
    """How one collection merges, and what a received entry of it must satisfy."""

    name: str
    grow_only: bool = False
    verify: Verify | None = None
    key_of: Callable[[Any], str] | None = None  # grow-only: the one key a value may have
    trust: bool = False  # it says who may write: merged first, trust recomputed after each

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ValueError(f"a collection name is letters, digits and _: {self.name!r}")
        if self.grow_only and self.key_of is None:
            raise ValueError("a grow-only collection needs key_of (content-addressed keys)")
        if not self.grow_only and self.key_of is not None:
            raise ValueError("only a grow-only collection is content-addressed")


def lww(name: str, verify: Verify | None = None) -> Collection:
    """A last-writer-wins collection (tombstones for deletes)."""
    return Collection(name, verify=verify)


def grow_only(name: str, verify: Verify | None = None,
              key_of: Callable[[Any], str] = content_key, trust: bool = False) -> Collection:
    """A grow-only collection: signed entries that are never overwritten or deleted."""
    return Collection(name, grow_only=True, verify=verify, key_of=key_of, trust=trust)


class Schema:
    """The collections a replica holds, by name (immutable: :meth:`register` returns a
    new schema)."""

    def __init__(self, collections: Iterable[Collection] = ()) -> None:
        self._by_name: dict[str, Collection] = {}
        for c in collections:
            if c.name in self._by_name:
                raise ValueError(f"collection {c.name!r} registered twice")
            self._by_name[c.name] = c

    def register(self, collection: Collection) -> Schema:
        """This schema with one more collection."""
        return Schema([*self._by_name.values(), collection])

    def get(self, name: str) -> Collection | None:
        return self._by_name.get(name)

    def __getitem__(self, name: str) -> Collection:
        if name not in self._by_name:
            raise ValueError(f"unknown collection {name!r}")
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[Collection]:
        return iter(self._by_name.values())

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._by_name)


@dataclass(frozen=True)
class Delta:
    """Entries a peer lacks, and the sender's version vector."""

    entries: tuple[Entry, ...]
    vector: dict[str, HLC]

    def to_dict(self) -> dict[str, Any]:
        return {"entries": [e.to_dict() for e in self.entries],
                "vector": {n: t.encode() for n, t in self.vector.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Delta:
        """Parse a received delta (raises ValueError, KeyError or TypeError)."""
        entries = tuple(Entry.from_dict(e) for e in d["entries"])
        vector = {str(n): HLC.decode(str(t)) for n, t in dict(d["vector"]).items()}
        if any(t.node != n for n, t in vector.items()):
            raise ValueError("a version vector entry names another node")
        return cls(entries, vector)


@dataclass
class MergeResult:
    """What a merge did: the entries that changed here, the refused ones by reason, and
    the held ones it dropped (void under the trust it brought)."""

    changed: list[Entry] = field(default_factory=list)
    refused: Counter[str] = field(default_factory=Counter)
    dropped: list[Entry] = field(default_factory=list)
    unchecked: set[str] = field(default_factory=set)  # origins with entries not checkable yet
    trust_changed: bool = False

    def __len__(self) -> int:
        return len(self.changed)


class Replica:
    """One pod's copy of the shared state.

    ``signer`` (the device key) signs this replica's own writes; ``trust`` builds the
    :class:`Trust` that received entries are checked against (without one, a replica
    merges nothing it receives).
    """

    def __init__(self, node: str, schema: Schema, *, clock: HybridClock | None = None,
                 signer: Ed25519PrivateKey | None = None,
                 trust: TrustFactory | None = None) -> None:
        self.node, self.schema = node, schema
        self.clock = clock or HybridClock(node)
        self.signer, self.trust_of = signer, trust
        self.entries: dict[tuple[str, str], Entry] = {}
        self.vector: dict[str, HLC] = {}
        self._trust: Trust | None = None

    def trust(self) -> Trust | None:
        """The trust as of the current state (recomputed after trust entries change)."""
        if self._trust is None and self.trust_of is not None:
            self._trust = self.trust_of(self)
        return self._trust

    def forget_trust(self) -> None:
        """Drop the cached trust (after the entries were changed from outside)."""
        self._trust = None

    # -- local edits ---------------------------------------------------------------

    def set(self, collection: str, key: str, value: Any) -> Entry:
        """Write ``value`` (plain JSON) under ``(collection, key)`` (last-writer-wins)."""
        return self._write(collection, key, value, deleted=False)

    def delete(self, collection: str, key: str) -> Entry:
        """Forget ``(collection, key)`` everywhere: a tombstone (last-writer-wins)."""
        return self._write(collection, key, None, deleted=True)

    def add(self, collection: str, value: Any) -> Entry:
        """Add ``value`` to a grow-only collection, under its own key (idempotent)."""
        spec = self.schema[collection]
        if not spec.grow_only or spec.key_of is None:
            raise ValueError(f"{collection!r} is not grow-only")
        value = json.loads(json.dumps(value))
        key = spec.key_of(value)
        current = self.entries.get((collection, key))
        if current is not None and current.value == value:
            return current
        return self._write(collection, key, value, deleted=False)

    def _write(self, collection: str, key: str, value: Any, deleted: bool) -> Entry:
        spec = self.schema[collection]
        value = json.loads(json.dumps(value))  # exactly what a peer will parse and check
        if spec.grow_only and (deleted or (collection, key) in self.entries
                               or spec.key_of is None or key != spec.key_of(value)):
            raise ValueError(f"{collection!r} is grow-only: entries are added with add(), "
                             "never overwritten or deleted")
        entry = Entry(collection, key, value, self.clock.now(), deleted)
        if self.signer is not None:
            entry = entry.signed_by(self.signer)
        self._store(entry, spec)
        return entry

    # -- reading -------------------------------------------------------------------

    def get(self, collection: str, key: str) -> Any:
        """The live value (None when absent or deleted)."""
        entry = self.entries.get((collection, key))
        return None if entry is None or entry.deleted else entry.value

    def items(self, collection: str) -> dict[str, Any]:
        """The live entries of a collection."""
        return {k: e.value for (c, k), e in sorted(self.entries.items())
                if c == collection and not e.deleted}

    def entries_of(self, collection: str) -> list[Entry]:
        """Every entry of a collection (tombstones too), in timestamp order."""
        return sorted((e for (c, _), e in self.entries.items() if c == collection),
                      key=lambda e: e.stamp)

    def state(self) -> dict[tuple[str, str], tuple[Any, bool]]:
        """Everything, tombstones included, without timestamps (for comparisons)."""
        return {k: (e.value, e.deleted) for k, e in sorted(self.entries.items())}

    # -- sync ----------------------------------------------------------------------

    def delta_for(self, peer_vector: Mapping[str, HLC]) -> Delta:
        """What a peer with ``peer_vector`` lacks."""
        missing = tuple(sorted(
            (e for e in self.entries.values()
             if e.stamp.node not in peer_vector or e.stamp > peer_vector[e.stamp.node]),
            key=lambda e: e.stamp))
        return Delta(missing, dict(self.vector))

    def merge(self, delta: Delta, peer: str | None = None) -> MergeResult:
        """Merge a whole delta sent by ``peer`` (the authenticated device, if any).

        Raises:
            ClockDriftError: an entry is stamped too far ahead of this pod's clock (the
                delta is refused whole).
        """
        if delta.entries:
            self.clock.check(max(e.stamp for e in delta.entries))
        result = self.merge_entries(delta.entries, peer)
        if result.dropped:
            return result  # everything comes again (see _drop_void): take no vector
        for node, stamp in delta.vector.items():
            if node in result.unchecked:
                continue  # entries we could not check yet must come again
            if node not in self.vector or stamp > self.vector[node]:
                self.vector[node] = stamp
        return result

    def merge_entries(self, entries: Iterable[Entry], peer: str | None = None) -> MergeResult:
        """Merge loose entries (no vector exchange); the same checks as :meth:`merge`."""
        result = MergeResult()
        entries = list(entries)
        # Trust entries first, in timestamp order, and again while one more gets in: one
        # may need another stamped later (a rotation's new certificate of a device, before
        # a revocation that device made meanwhile with the old key).
        pending = sorted((e for e in entries if self._is_trust(e)), key=lambda e: e.stamp)
        while pending:
            refused: list[tuple[Entry, str]] = []
            stored = False
            for entry in pending:
                why = self._refusal(entry, self.schema.get(entry.collection))
                if why is not None:
                    refused.append((entry, why))
                elif self._store(entry, self.schema[entry.collection]):
                    result.changed.append(entry)
                    result.trust_changed = stored = True
            if not stored:  # the trust is what it was: the rest would be refused again
                break
            pending = [e for e, _ in refused]
        else:
            refused = []
        for entry, why in refused:
            self._count(result, entry, why)
        others = sorted((e for e in entries if not self._is_trust(e)), key=lambda e: e.stamp)
        trust = self.trust()
        if others and peer is not None and trust is not None and not trust.may_sync(peer):
            result.refused["peer_not_trusted"] += len(others)  # no longer current
            others = []
        for entry in others:
            spec = self.schema.get(entry.collection)
            why = self._refusal(entry, spec)
            if why is not None or spec is None:
                self._count(result, entry, why or "foreign_collection")
            elif self._store(entry, spec):
                result.changed.append(entry)
        if result.trust_changed:
            self._drop_void(result)
        if result.changed:
            self.clock.observe(max(e.stamp for e in result.changed))
        return result

    @staticmethod
    def _count(result: MergeResult, entry: Entry, why: str) -> None:
        result.refused[why] += 1
        if why.startswith("unknown_"):  # not checkable yet: it must come again
            result.unchecked.add(entry.origin)

    def _drop_void(self, result: MergeResult) -> None:
        """Drop the held entries the new trust voids (a revoked device's entries that its
        revocation did not keep). One of them may have overwritten an entry that still
        counts, which this replica no longer has: it forgets its version vector (but its
        own node's), so that every peer sends it everything again."""
        trust = self.trust()
        if trust is None:
            return
        for key, entry in list(self.entries.items()):
            if trust.void(entry):
                del self.entries[key]
                result.dropped.append(entry)
        if result.dropped:
            self.vector = {n: t for n, t in self.vector.items() if n == self.node}
            gone = {(e.collection, e.key, e.stamp) for e in result.dropped}
            result.changed = [e for e in result.changed
                              if (e.collection, e.key, e.stamp) not in gone]

    def _is_trust(self, entry: Entry) -> bool:
        spec = self.schema.get(entry.collection)
        return spec is not None and spec.trust

    def _refusal(self, entry: Entry, spec: Collection | None) -> str | None:
        """Why a received entry may not be merged (None: it may)."""
        if spec is None:
            return "foreign_collection"
        current = self.entries.get((entry.collection, entry.key))
        if current is not None and current.signature == entry.signature \
                and current.stamp == entry.stamp:
            return None  # the very entry we hold (checked when it came)
        if spec.grow_only:
            if entry.deleted:
                return "tombstone"
            try:
                if spec.key_of is None or entry.key != spec.key_of(entry.value):
                    return "wrong_key"
            except (KeyError, TypeError, ValueError):  # not even the shape its key needs
                return "wrong_key"
            if current is not None and (current.deleted or current.value != entry.value):
                return "overwrite"
        if not entry.signature:
            return "unsigned"
        trust = self.trust()
        if trust is None:
            return "no_trust"
        key = trust.origin_key(entry)
        if key is None:
            return "unknown_origin"
        if not verify_signature(key, entry.signature, entry.signed_bytes()):
            return "bad_signature"
        why = trust.refusal(entry)
        if why is not None:
            return why
        if not spec.grow_only and current is not None and current.stamp >= entry.stamp:
            return None  # older than what is held: it changes nothing, whatever it says
        if spec.verify is not None:
            try:
                spec.verify(entry, trust, current)
            except Refused as exc:
                return exc.reason
            except (ValueError, KeyError, TypeError):
                return "invalid"
        return None

    def _store(self, entry: Entry, spec: Collection) -> bool:
        """Keep ``entry`` if it wins over what is held; whether anything changed."""
        key, origin = (entry.collection, entry.key), entry.origin
        if origin not in self.vector or entry.stamp > self.vector[origin]:
            self.vector[origin] = entry.stamp
        current = self.entries.get(key)
        if spec.grow_only:
            # The same value written twice (by two pods): keep the earlier write, so
            # every replica holds the same entry whatever the order.
            if current is not None and current.stamp <= entry.stamp:
                return False
            self.entries[key] = entry
            if spec.trust:
                self._trust = None
            return True
        if current is not None and current.stamp >= entry.stamp:
            return False
        self.entries[key] = entry
        if spec.trust:
            self._trust = None
        return True
