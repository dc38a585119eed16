"""The replicated state of one user's pods: a last-writer-wins map with tombstones.

Every piece of shared state (profile fields, preferences, consents, the budget policy,
devices, revocations, opted-in memories) is an entry ``(collection, key)`` holding a
JSON value or a tombstone, stamped with the hybrid logical timestamp of its last write.
Merging keeps, per entry, the one with the larger timestamp: merge is commutative,
associative and idempotent, so replicas that have seen the same writes hold the same
state whatever the order, repetition or grouping of deliveries. A delete is a tombstone
(never a removal), so forgetting on one pod forgets on all, and an older write that
arrives later cannot bring the entry back.

Sync is incremental. Each replica keeps a version vector: per origin node, the largest
timestamp it has merged from that node. A delta for a peer holds every entry whose
timestamp is newer than the peer's vector says for its origin; after merging a whole
delta the peer takes the sender's vector too (entries the sender no longer holds were
overwritten by ones it does hold). A delivery cut short is simply sent again.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from covey.protocols._hlc import HLC, HybridClock

__all__ = ["COLLECTIONS", "Delta", "Entry", "Replica"]

#: What pods of one user share. ``memories`` only where the user opts in.
COLLECTIONS = ("profile", "preferences", "consents", "budget_policy", "devices",
               "revocations", "memories")


@dataclass(frozen=True)
class Entry:
    """One replicated value (``deleted``: a tombstone, ``value`` is None)."""

    collection: str
    key: str
    value: Any
    stamp: HLC
    deleted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"c": self.collection, "k": self.key, "v": self.value,
                "t": self.stamp.encode(), "d": self.deleted}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Entry:
        """Parse a received entry (raises ValueError, KeyError or TypeError)."""
        collection, key = str(d["c"]), str(d["k"])
        if collection not in COLLECTIONS:
            raise ValueError(f"unknown collection {collection!r}")
        deleted = d["d"]
        if not isinstance(deleted, bool) or (deleted and d["v"] is not None):
            raise ValueError("a tombstone carries no value")
        json.dumps(d["v"])  # must be plain JSON
        return cls(collection, key, d["v"], HLC.decode(str(d["t"])), deleted)


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


class Replica:
    """One pod's copy of the shared state."""

    def __init__(self, node: str, clock: HybridClock | None = None) -> None:
        self.node = node
        self.clock = clock or HybridClock(node)
        self.entries: dict[tuple[str, str], Entry] = {}
        self.vector: dict[str, HLC] = {}

    # -- local edits ---------------------------------------------------------------

    def set(self, collection: str, key: str, value: Any) -> Entry:
        """Write ``value`` (plain JSON) under ``(collection, key)``."""
        return self._write(collection, key, value, deleted=False)

    def delete(self, collection: str, key: str) -> Entry:
        """Forget ``(collection, key)`` everywhere: a tombstone."""
        return self._write(collection, key, None, deleted=True)

    def _write(self, collection: str, key: str, value: Any, deleted: bool) -> Entry:
        if collection not in COLLECTIONS:
            raise ValueError(f"unknown collection {collection!r}")
        json.dumps(value)
        entry = Entry(collection, key, value, self.clock.now(), deleted)
        self._merge_one(entry)
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

    def merge(self, delta: Delta) -> int:
        """Merge a whole delta; the number of entries that changed here."""
        return len(self.merge_changes(delta))

    def merge_changes(self, delta: Delta) -> list[Entry]:
        """Merge a whole delta; the entries that changed here.

        Raises:
            ClockDriftError: an entry is stamped too far ahead of this pod's clock (the
                delta is refused whole).
        """
        if delta.entries:
            self.clock.observe(max(e.stamp for e in delta.entries))
        changed = [e for e in delta.entries if self._merge_one(e)]
        for node, stamp in delta.vector.items():
            if node not in self.vector or stamp > self.vector[node]:
                self.vector[node] = stamp
        return changed

    def _merge_one(self, entry: Entry) -> bool:
        key = (entry.collection, entry.key)
        current = self.entries.get(key)
        origin = entry.stamp.node
        if origin not in self.vector or entry.stamp > self.vector[origin]:
            self.vector[origin] = entry.stamp
        if current is not None and current.stamp >= entry.stamp:
            return False
        self.entries[key] = entry
        return True

    def merge_entries(self, entries: Iterable[Entry]) -> int:
        """Merge loose entries (state-based merge, no vector exchange)."""
        return sum(self._merge_one(e) for e in entries)
