"""The pod's append-only, hash-chained audit log.

Each entry records one event that matters for privacy (an egress, an export, an
erasure, a key change): what, to whom, how many bytes, how much ε, and never content.
Entry ``n`` carries ``prev_hash`` = hash of entry ``n-1`` and its own
``hash = SHA-256(canonical JSON of its fields and prev_hash)``. Triggers refuse UPDATE
and DELETE; the chain head is also kept in ``meta``, so a dropped tail is detected.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlcipher3.dbapi2 as sqlite

from covey.device._store import set_meta

__all__ = ["GENESIS", "AuditEntry", "ChainCheck", "append", "entries", "verify"]

GENESIS = "0" * 64
_HEAD_KEY = "audit_head"


@dataclass(frozen=True)
class AuditEntry:
    """One row of the audit log."""

    seq: int
    created_at: str
    kind: str
    peer: str
    bytes: int
    epsilon: float
    detail: dict[str, Any]
    prev_hash: str
    hash: str


@dataclass(frozen=True)
class ChainCheck:
    """The outcome of verifying the chain: ``ok``, or the first bad entry and why."""

    ok: bool
    entries: int
    bad_seq: int | None = None
    reason: str = ""


def _digest(seq: int, created_at: str, kind: str, peer: str, nbytes: int, epsilon: float,
            detail: str, prev_hash: str) -> str:
    canonical = json.dumps(
        [seq, created_at, kind, peer, nbytes, float(epsilon), detail, prev_hash],
        ensure_ascii=True, separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def append(conn: sqlite.Connection, kind: str, *, peer: str = "", nbytes: int = 0,
           epsilon: float = 0.0, detail: dict[str, Any] | None = None) -> AuditEntry:
    """Append an entry; call inside the write transaction of the event it records."""
    row = conn.execute("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
    seq, prev = (row[0] + 1, row[1]) if row else (1, GENESIS)
    created_at = datetime.now(UTC).isoformat(timespec="microseconds")
    detail_json = json.dumps(detail or {}, sort_keys=True, separators=(",", ":"))
    digest = _digest(seq, created_at, kind, peer, nbytes, epsilon, detail_json, prev)
    conn.execute(
        "INSERT INTO audit_log (seq, created_at, kind, peer, bytes, epsilon, detail,"
        " prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (seq, created_at, kind, peer, nbytes, float(epsilon), detail_json, prev, digest),
    )
    set_meta(conn, _HEAD_KEY, f"{seq}:{digest}")
    return AuditEntry(seq, created_at, kind, peer, nbytes, float(epsilon),
                      detail or {}, prev, digest)


def entries(conn: sqlite.Connection) -> list[AuditEntry]:
    """All entries in order."""
    rows = conn.execute(
        "SELECT seq, created_at, kind, peer, bytes, epsilon, detail, prev_hash, hash"
        " FROM audit_log ORDER BY seq"
    ).fetchall()
    return [AuditEntry(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), r[7], r[8])
            for r in rows]


def verify(conn: sqlite.Connection) -> ChainCheck:
    """Recompute every hash and link; compare the last entry with the recorded head."""
    prev = GENESIS
    expected_seq = 1
    count = 0
    for r in conn.execute(
        "SELECT seq, created_at, kind, peer, bytes, epsilon, detail, prev_hash, hash"
        " FROM audit_log ORDER BY seq"
    ):
        seq = r[0]
        if seq != expected_seq:
            return ChainCheck(False, count, expected_seq, "entry missing")
        if r[7] != prev:
            return ChainCheck(False, count, seq, "does not link to the entry before it")
        if _digest(seq, r[1], r[2], r[3], r[4], r[5], r[6], r[7]) != r[8]:
            return ChainCheck(False, count, seq, "content does not match its hash")
        prev = r[8]
        expected_seq += 1
        count += 1
    head = conn.execute("SELECT value FROM meta WHERE key = ?", (_HEAD_KEY,)).fetchone()
    recorded = head[0] if head else f"0:{GENESIS}"
    if recorded != f"{count}:{prev}":
        return ChainCheck(False, count, count + 1, "entries after this one were removed")
    return ChainCheck(True, count)
