"""The replicated state as the pod's tables hold it: entry keys, stamps, and saving.

The low half of sync, with no dependency on the rest of the pod, so that the pod can
wire the one write that must happen outside a sync session into its memories: forgetting
a shared memory tombstones it in the same transaction (:func:`record_forgotten`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from datetime import UTC, datetime
from typing import Any

import sqlcipher3.dbapi2 as sqlite
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from covey.protocols import HLC, Entry

__all__ = ["memory_key", "next_stamp", "record_forgotten", "save_entries", "save_vector"]


def memory_key(kind: str, text: str) -> str:
    """The replicated key of a memory: the same text and kind on two pods is one memory."""
    return hashlib.sha256(f"{kind}\0{text}".encode()).hexdigest()[:32]


def next_stamp(conn: sqlite.Connection, node: str) -> HLC:
    """A timestamp for a write made outside a live replica (a CLI command)."""
    row = conn.execute("SELECT max(stamp) FROM sync_entries").fetchone()
    wall = int(datetime.now(UTC).timestamp() * 1000)
    if row and row[0]:
        last = HLC.decode(row[0])
        if last.wall >= wall:
            return HLC(last.wall, last.counter + 1, node)
    return HLC(wall, 0, node)


def _rows(entries: list[Entry]) -> list[tuple[Any, ...]]:
    return [(e.collection, e.key, None if e.deleted else json.dumps(e.value), e.stamp.encode(),
             int(e.deleted), e.signature) for e in entries]


def save_entries(conn: sqlite.Connection, entries: list[Entry], grow_only: Collection[str]
                 ) -> None:
    """Store entries as the replica holds them. The guards keep another process's newer
    write: last-writer-wins keeps the larger stamp, the ``grow_only`` collections the
    earlier copy (kept first-come, never replaced)."""
    grow = [e for e in entries if e.collection in grow_only]
    conn.executemany(
        "INSERT INTO sync_entries (collection, key, value, stamp, deleted, signature)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (collection, key) DO UPDATE SET"
        " value = excluded.value, stamp = excluded.stamp, deleted = excluded.deleted,"
        " signature = excluded.signature WHERE excluded.stamp > stamp",
        _rows([e for e in entries if e.collection not in grow_only]))
    conn.executemany(
        "INSERT INTO sync_entries (collection, key, value, stamp, deleted, signature)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (collection, key) DO UPDATE SET"
        " stamp = excluded.stamp, signature = excluded.signature"
        " WHERE excluded.stamp < stamp", _rows(grow))


def save_vector(conn: sqlite.Connection, vector: dict[str, HLC]) -> None:
    """Advance the stored version vector to ``vector`` (never back)."""
    conn.executemany(
        "INSERT INTO sync_vector (node, stamp) VALUES (?, ?) ON CONFLICT (node) DO UPDATE"
        " SET stamp = excluded.stamp WHERE excluded.stamp > stamp",
        [(node, stamp.encode()) for node, stamp in vector.items()])


def record_forgotten(conn: sqlite.Connection, kind: str, text: str,
                     device_key: Ed25519PrivateKey) -> None:
    """Inside a deletion's transaction: if the memory was shared, tombstone it everywhere,
    signed with the pod's ``device_key`` (which lives in the key file, not the store)."""
    key = memory_key(kind, text)
    row = conn.execute("SELECT deleted FROM sync_entries WHERE collection = 'memories'"
                       " AND key = ?", (key,)).fetchone()
    if row is None or row[0]:
        return
    node = conn.execute("SELECT device_id FROM identity").fetchone()[0]
    stamp = next_stamp(conn, str(node))
    tombstone = Entry("memories", key, None, stamp, deleted=True)
    # memories are last-writer-wins: a tombstone replaces an older copy
    save_entries(conn, [tombstone.signed_by(device_key)], grow_only=())
    save_vector(conn, {str(node): stamp})
