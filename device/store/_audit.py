"""The pod's append-only, hash-chained audit log, with a signed head kept outside it.

Each entry records one event that matters for privacy (an egress, an export, an
erasure, a key change): what, to whom, how many bytes, how much ε, and never content.
Entry ``n`` carries ``prev_hash`` = hash of entry ``n-1`` and its own
``hash = SHA-256(canonical JSON of its fields and prev_hash)``. Triggers refuse UPDATE
and DELETE.

The chain head (the last sequence number and hash) is signed by the device key and kept
outside the store, in ``audit.head`` (0600), as the privacy ledger's is: the device key
lives in the key file, not in the store, so whoever can rewrite the store with the data
key alone can neither cut the log's tail nor rewrite an entry (recomputing every hash)
without :func:`verify` saying so. After every committed transaction that added entries
the pod moves the signed head forward (:meth:`AuditHead.advance`), and only over entries
that extend the chain it signed before.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlcipher3.dbapi2 as sqlite

from covey._files import write_atomic

__all__ = ["GENESIS", "HEAD_FILE", "AuditEntry", "AuditHead", "ChainCheck", "append",
           "entries", "verify"]

GENESIS = "0" * 64
HEAD_FILE = "audit.head"
_HEAD_CONTEXT = b"covey-audit-head-v1\0"
# Where covey before the signed head kept it, in the store (readable and writable with
# the data key alone); read once, when such a pod adopts its chain.
_LEGACY_HEAD_KEY = "audit_head"
_log = logging.getLogger(__name__)
_COLUMNS = "seq, created_at, kind, peer, bytes, epsilon, detail, prev_hash, hash"


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
    signed: int = 0  # the entries the signed head covers (later ones: after its last move)


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


def _walk(rows: Sequence[Any], prev: str = GENESIS, expected_seq: int = 1
          ) -> tuple[int, str, ChainCheck | None]:
    """Check each row's hash and link; returns the count, the last hash and the first
    failure (None when every row holds)."""
    count = 0
    for r in rows:
        seq = r[0]
        if seq != expected_seq:
            return count, prev, ChainCheck(False, count, expected_seq, "entry missing")
        if r[7] != prev:
            return count, prev, ChainCheck(False, count, seq,
                                           "does not link to the entry before it")
        if _digest(seq, r[1], r[2], r[3], r[4], r[5], r[6], r[7]) != r[8]:
            return count, prev, ChainCheck(False, count, seq,
                                           "content does not match its hash")
        prev = r[8]
        expected_seq += 1
        count += 1
    return count, prev, None


def _head_bytes(device_id: str, seq: int, digest: str) -> bytes:
    return _HEAD_CONTEXT + f"{device_id}:{seq}:{digest}".encode()


class AuditHead:
    """The audit chain's head, signed by the device key, in a file beside the store."""

    def __init__(self, path: Path, device_id: str, public_key: bytes,
                 sign: Callable[[bytes], bytes]) -> None:
        self.path = path
        self.device_id = device_id
        self.public_key = public_key
        self._sign = sign
        self._signed = -1  # the highest entry this process knows the head covers

    def exists(self) -> bool:
        """Whether the head file is there (verified or not)."""
        return self.path.exists()

    def read(self) -> tuple[int, str] | str:
        """The signed (sequence number, hash), or why there is none to trust."""
        from covey.privacy import verify_signature

        if not self.path.exists():
            return f"the signed chain head ({self.path.name}) is missing"
        try:
            head = json.loads(self.path.read_text())
            seq, digest = int(head["seq"]), str(head["hash"])
            signature = bytes.fromhex(str(head["signature"]))
        except (OSError, ValueError, KeyError, TypeError):
            return f"the signed chain head ({self.path.name}) is unreadable"
        if head.get("device_id") != self.device_id or not verify_signature(
                self.public_key, signature, _head_bytes(self.device_id, seq, digest)):
            return "the chain head is not signed by this device"
        return seq, digest

    def _write(self, seq: int, digest: str) -> None:
        signature = self._sign(_head_bytes(self.device_id, seq, digest))
        write_atomic(self.path, json.dumps({"device_id": self.device_id, "seq": seq,
                                            "hash": digest,
                                            "signature": signature.hex()}).encode())
        self._signed = seq

    def start(self, conn: sqlite.Connection, legacy: bool = False) -> bool:
        """Sign the head at the end of the chain, if every entry holds: a new pod, or a
        pod from before the signed head adopting its chain once (``legacy``: its head
        recorded in the store must match too). Returns whether a head was signed."""
        rows = conn.execute(f"SELECT {_COLUMNS} FROM audit_log ORDER BY seq").fetchall()  # noqa: S608
        count, last, failure = _walk(rows)
        if failure is not None:
            return False
        if legacy:  # entries this covey added since (it no longer keeps that head) extend it
            row = conn.execute("SELECT value FROM meta WHERE key = ?",
                               (_LEGACY_HEAD_KEY,)).fetchone()
            seq_text, _, digest = (row[0] if row else f"0:{GENESIS}").partition(":")
            seq = int(seq_text) if seq_text.isdigit() else -1
            if not 0 <= seq <= count or (rows[seq - 1][8] if seq else GENESIS) != digest:
                return False
        self._write(count, last)
        return True

    def advance(self, conn: sqlite.Connection) -> None:
        """Move the signed head over the entries committed after it, if they extend the
        chain it signed (never over a rewritten one). Runs after each commit, under the
        store's write lock, so that two processes' heads never go back."""
        last = conn.execute("SELECT MAX(seq) FROM audit_log").fetchone()[0]
        if last is None or last <= self._signed:
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite.OperationalError:
            return  # busy: the next commit moves the head
        try:
            head = self.read()
            if isinstance(head, str):
                return  # only start() makes a head; verify() reports a missing one
            seq, digest = head
            rows = conn.execute(f"SELECT {_COLUMNS} FROM audit_log WHERE seq >= ?"  # noqa: S608
                                " ORDER BY seq", (seq,)).fetchall()
            if seq:  # the head's own entry must still be the one it signed
                if not rows or rows[0][0] != seq or rows[0][8] != digest:
                    return
                rows = rows[1:]
            count, tip, failure = _walk(rows, digest, seq + 1)
            if failure is None and count:
                self._write(seq + count, tip)
            elif failure is None:
                self._signed = seq
        except OSError as exc:  # the entries are committed; the next commit signs them
            _log.warning("could not move the signed audit head: %s", exc.strerror)
        finally:
            conn.execute("ROLLBACK")


def verify(conn: sqlite.Connection, head: AuditHead) -> ChainCheck:
    """Recompute every hash and link, and compare the chain with the signed head."""
    rows = conn.execute(f"SELECT {_COLUMNS} FROM audit_log ORDER BY seq").fetchall()  # noqa: S608
    count, _, failure = _walk(rows)
    if failure is not None:
        return failure
    signed = head.read()
    if isinstance(signed, str):
        return ChainCheck(False, count, count + 1, signed)
    seq, digest = signed
    if count < seq:
        return ChainCheck(False, count, count + 1, "entries after this one were removed "
                                                   f"(the signed head is at {seq})")
    if (rows[seq - 1][8] if seq else GENESIS) != digest:
        return ChainCheck(False, count, seq, "differs from the entry the head signed")
    # Entries after the signed head extend it (each links to the one before): they were
    # committed after its last move (a crash in between, or a writer that found the
    # store busy), and the next commit signs them.
    return ChainCheck(True, count, signed=seq)
