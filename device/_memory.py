"""The pod's memories: adding, listing, keyword search (FTS5) and erasure."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from covey.device import _audit
from covey.device._store import Store
from covey.errors import InvalidInputError

__all__ = ["MEMORY_KINDS", "Memories", "Memory", "MemoryHit"]

MEMORY_KINDS = ("fact", "preference", "episode", "summary", "note")
MAX_MEMORY_CHARS = 8192
_WORD = re.compile(r"\w+", re.UNICODE)
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Memory:
    """One thing the pod remembers about its user."""

    id: int
    text: str
    kind: str
    created_at: str
    updated_at: str
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "id": self.id, "text": self.text, "kind": self.kind,
            "created_at": self.created_at, "updated_at": self.updated_at,
            "provenance": self.provenance,
        }


@dataclass(frozen=True)
class MemoryHit:
    """A search result: the memory and its rank score (higher is better)."""

    memory: Memory
    score: float


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _row_to_memory(row: Any) -> Memory:
    return Memory(row["id"], row["text"], row["kind"], row["created_at"], row["updated_at"],
                  json.loads(row["provenance"]))


def fts_query(text: str) -> str | None:
    """Turn free text into a safe FTS5 query: every word quoted, any may match.

    Splitting is on whitespace only; FTS5 then tokenizes each quoted chunk with the same
    tokenizer as the index, so Python's idea of a word never disagrees with SQLite's.
    """
    words = text.split()
    if not any(_WORD.search(w) or not w.isascii() for w in words):
        return None
    return " OR ".join('"' + w.replace('"', '""') + '"' for w in words)


class Memories:
    """Memories stored in the pod's encrypted database."""

    def __init__(self, store: Store, on_erase: Callable[[], None]) -> None:
        self._store = store
        self._on_erase = on_erase

    def add(self, text: str, kind: str = "note", provenance: dict[str, Any] | None = None
            ) -> Memory:
        """Store a memory and return it.

        Raises:
            InvalidInputError: empty or oversized text, or an unknown kind.
        """
        text = text.strip()
        if not text:
            raise InvalidInputError("a memory needs some text")
        if len(text) > MAX_MEMORY_CHARS:
            raise InvalidInputError(f"a memory holds at most {MAX_MEMORY_CHARS} characters")
        if kind not in MEMORY_KINDS:
            raise InvalidInputError(f"memory kind must be one of {', '.join(MEMORY_KINDS)}")
        now = _now()
        prov = json.dumps(provenance or {"source": "manual"}, sort_keys=True)
        with self._store.transaction() as c:
            cur = c.execute(
                "INSERT INTO memories (text, kind, provenance, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?)", (text, kind, prov, now, now),
            )
            mid = int(cur.lastrowid or 0)
        _log.info("memory %d added (kind %s, %d chars)", mid, kind, len(text))
        return Memory(mid, text, kind, now, now, json.loads(prov))

    def get(self, memory_id: int) -> Memory | None:
        """One memory by id, or None."""
        rows = self._store.query("SELECT * FROM memories WHERE id = ?", (memory_id,))
        return _row_to_memory(rows[0]) if rows else None

    def all(self, kind: str | None = None, limit: int | None = None) -> list[Memory]:
        """Memories, newest first, optionally of one kind."""
        sql = "SELECT * FROM memories"
        params: tuple[Any, ...] = ()
        if kind is not None:
            sql += " WHERE kind = ?"
            params = (kind,)
        sql += " ORDER BY id DESC"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [_row_to_memory(r) for r in self._store.query(sql, params)]

    def search(self, query: str, limit: int = 10) -> list[MemoryHit]:
        """Keyword search over memories, best match first (BM25)."""
        match = fts_query(query)
        if match is None:
            return []
        rows = self._store.query(
            "SELECT m.*, bm25(memories_fts) AS rank FROM memories_fts"
            " JOIN memories m ON m.id = memories_fts.rowid"
            " WHERE memories_fts MATCH ? ORDER BY rank LIMIT ?",
            (match, int(limit)),
        )
        return [MemoryHit(_row_to_memory(r), -float(r["rank"])) for r in rows]

    def forget(self, memory_id: int) -> bool:
        """Erase a memory from the table, the keyword index and the file pages.

        Returns False when no memory has that id.
        """
        with self._store.transaction() as c:
            cur = c.execute("DELETE FROM memories WHERE id = ?", (memory_id,))
            if cur.rowcount == 0:
                return False
            _audit.append(c, "erasure", detail={"table": "memories", "rows": 1})
        self._on_erase()
        _log.info("memory %d erased", memory_id)
        return True

    def count(self) -> int:
        """How many memories are stored."""
        return int(self._store.query("SELECT count(*) FROM memories")[0][0])
