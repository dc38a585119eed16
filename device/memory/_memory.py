"""The pod's memories: adding, listing, keyword search (FTS5) and erasure."""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np
import sqlcipher3.dbapi2 as sqlite

from covey._time import utc_timestamp
from covey.device.memory._fusion import fuse_with_decay
from covey.device.memory._vector import VectorIndex, VectorIndexConfig, encode_vector, load_vectors
from covey.device.store import _audit
from covey.device.store._store import Store
from covey.errors import InvalidInputError

__all__ = ["MEMORY_KINDS", "Memories", "Memory", "MemoryHit"]

MEMORY_KINDS = ("fact", "preference", "episode", "summary", "note")
MAX_MEMORY_CHARS = 8192
EMBEDDING_MODEL = "all-MiniLM-L6-v2"
# Two memories of one kind this close in meaning are one memory said twice.
DUPLICATE_COSINE = 0.95
HALF_LIFE_S = 30 * 86400.0
DECAY_FLOOR = 0.5
# Below this cosine a memory is unrelated to the query: MiniLM gives unrelated short
# sentences about 0.0 to 0.2, paraphrases 0.5 and more.
MIN_SIMILARITY = 0.3
# A keyword found in more than this share of memories ("the", "my") ranks little and
# makes FTS5 read a long posting list; it is left out of keyword queries on larger
# stores (the semantic leg still finds such memories). 2 % keeps hybrid recall at 100k
# memories under 10 ms p95 (benchmark ``recall``); a word in at most
# COMMON_WORD_MIN_DOCS memories is always kept, so small stores lose nothing.
COMMON_WORD_SHARE = 0.02
COMMON_WORD_MIN_DOCS = 50
COMMON_WORD_MIN_MEMORIES = 200
# Document frequencies are cached until the store's size moves by more than this share
# (fts5vocab counts a term's documents by reading its whole posting list).
_DF_REFRESH_SHARE = 0.05
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



# What a Memory is read from: every column but the embedding, which only the index needs
# (reading it makes SQLCipher decrypt its overflow pages).
_COLUMNS = "id, text, kind, created_at, updated_at, provenance"
_M_COLUMNS = ", ".join(f"m.{c}" for c in _COLUMNS.split(", "))


def _row_to_memory(row: Any) -> Memory:
    return Memory(row["id"], row["text"], row["kind"], row["created_at"], row["updated_at"],
                  json.loads(row["provenance"]))


def _fold(chunk: str) -> list[str]:
    """Words of a chunk as the index stores them (lower case, diacritics removed)."""
    decomposed = unicodedata.normalize("NFKD", chunk.lower())
    plain = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return _WORD.findall(plain)


def fts_query(text: str) -> str | None:
    """Turn free text into a safe FTS5 query: every word quoted, any may match.

    Splitting is on whitespace only; FTS5 then tokenizes each quoted chunk with the same
    tokenizer as the index, so Python's idea of a word never disagrees with SQLite's.
    """
    words = text.split()
    if not any(_WORD.search(w) or not w.isascii() for w in words):
        return None
    return " OR ".join('"' + w.replace('"', '""') + '"' for w in words)


class TextEmbedder(Protocol):
    """What memories need of an embedder."""

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit vectors, one row per text."""
        ...


#: Runs inside a memory's deletion, in its transaction: ``(conn, kind, text)``.
Forget = Callable[[sqlite.Connection, str, str], None]


def _age_seconds(stamp: str, now: datetime) -> float:
    return max(0.0, (now - datetime.fromisoformat(stamp)).total_seconds())


class Memories:
    """Memories in the pod's encrypted database, with keyword and semantic recall.

    The semantic layer is an in-memory vector index built from the stored embeddings on
    first use and kept in step with this process's writes; it is never written to disk.
    Writes from other processes are picked up at the next recall.
    """

    def __init__(self, store: Store, on_erase: Callable[[], None],
                 embedder: TextEmbedder | None = None,
                 on_forget: Forget | None = None) -> None:
        self._store = store
        self._on_erase = [on_erase]
        self._on_forget = on_forget
        self._embedder = embedder
        self._index: VectorIndex | None = None
        self._stamp: int | None = None  # the memories_stamp the index reflects
        self._df: dict[str, int] = {}  # term -> memories holding it, at _df_total
        self._df_total = 0

    @property
    def index(self) -> VectorIndex | None:
        """The in-memory vector index, once built (by :meth:`prepare` or a recall)."""
        return self._index

    def after_erasure(self, action: Callable[[], None]) -> None:
        """Also run ``action`` after each erasure (a generator drops the key/value cache
        of a prompt that may have held the erased text)."""
        self._on_erase.append(action)

    def use_embedder(self, embedder: TextEmbedder) -> None:
        """Turn on semantic recall and near-duplicate merging."""
        self._embedder = embedder
        self._index = None

    # -- writes ----------------------------------------------------------------------

    def _validate(self, text: str, kind: str) -> str:
        text = text.strip()
        if not text:
            raise InvalidInputError("a memory needs some text")
        if len(text) > MAX_MEMORY_CHARS:
            raise InvalidInputError(f"a memory holds at most {MAX_MEMORY_CHARS} characters")
        if kind not in MEMORY_KINDS:
            raise InvalidInputError(f"memory kind must be one of {', '.join(MEMORY_KINDS)}")
        return text

    def insert(self, conn: sqlite.Connection, text: str, kind: str,
               provenance: dict[str, Any]) -> int:
        """Store a memory inside the caller's transaction; a near-duplicate is merged.

        Returns the id of the new memory, or of the one it merged into.
        """
        text = self._validate(text, kind)
        now = utc_timestamp()
        vector = self._embed(text)
        if vector is not None:
            twin = self._near_duplicate(conn, vector, kind)
            if twin is not None:
                before = self._stamp_before(conn)
                conn.execute("UPDATE memories SET text = ?, updated_at = ?, embedding = ?"
                             " WHERE id = ?", (text, now, encode_vector(vector), twin))
                self._reindex(conn, before, twin, vector)
                return twin
        before = self._stamp_before(conn)
        cur = conn.execute(
            "INSERT INTO memories (text, kind, provenance, created_at, updated_at, embedding,"
            " embedding_model) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (text, kind, json.dumps(provenance, sort_keys=True), now, now,
             encode_vector(vector) if vector is not None else None,
             EMBEDDING_MODEL if vector is not None else None),
        )
        mid = int(cur.lastrowid or 0)
        if vector is not None:
            self._reindex(conn, before, mid, vector)
        return mid

    def delete(self, conn: sqlite.Connection, memory_id: int) -> bool:
        """Delete a memory and the graph edges it asserted, in the caller's transaction
        (with ``on_forget``'s writes: the pod tombstones a memory it shared, so the user's
        other pods forget it too)."""
        row = conn.execute("SELECT kind, text FROM memories WHERE id = ?", (memory_id,)).fetchone()
        if row is not None and self._on_forget is not None:
            self._on_forget(conn, row[0], row[1])
        conn.execute("DELETE FROM graph_edges WHERE json_extract(provenance, '$.memory_id') = ?",
                     (memory_id,))
        before = self._stamp_before(conn)
        gone = conn.execute("DELETE FROM memories WHERE id = ?", (memory_id,)).rowcount > 0
        if gone and self._index is not None:
            if memory_id in self._index:
                self._index.remove([memory_id])
            self._follow(conn, before)
        return gone

    def mark_used(self, conn: sqlite.Connection, memory_ids: list[int]) -> None:
        """Count a use of each memory (a reply recalled it), in the caller's transaction."""
        for memory_id in memory_ids:
            conn.execute("UPDATE memories SET last_used_at = ?, use_count = use_count + 1"
                         " WHERE id = ?", (utc_timestamp(), memory_id))

    def learned_from(self, conn: sqlite.Connection, message_id: int) -> list[int]:
        """The memories learned from a message, read in the caller's transaction."""
        return [int(r[0]) for r in conn.execute("SELECT id, provenance FROM memories")
                if json.loads(r[1]).get("message_id") == message_id]

    def _embed(self, text: str) -> np.ndarray | None:
        if self._embedder is None:
            return None
        return np.asarray(self._embedder.embed([text])[0], dtype=np.float32)

    def _near_duplicate(self, conn: sqlite.Connection, vector: np.ndarray, kind: str
                        ) -> int | None:
        # Inside the caller's transaction: read-only, so no backfill here.
        index = self._ensure_index(backfill=False)
        for mid, score in index.search(vector, 3):
            if score < DUPLICATE_COSINE:
                break
            row = conn.execute("SELECT kind FROM memories WHERE id = ?", (mid,)).fetchone()
            if row is not None and row[0] == kind:
                return mid
        return None

    def _reindex(self, conn: sqlite.Connection, before: int | None, memory_id: int,
                 vector: np.ndarray) -> None:
        """Put this process's write of ``memory_id`` into the index."""
        if self._index is None:
            return
        if memory_id in self._index:
            self._index.remove([memory_id])
        self._index.add([memory_id], vector[None, :])
        self._follow(conn, before)

    def _stamp_now(self, conn: sqlite.Connection | None = None) -> int:
        """The store's memories stamp (schema v6), which every write to memories changes."""
        sql = "SELECT stamp FROM memories_stamp WHERE id = 1"
        row = (conn.execute(sql).fetchone() if conn is not None else self._store.query(sql)[0])
        return int(row[0])

    def _stamp_before(self, conn: sqlite.Connection) -> int | None:
        """The stamp before one of this process's writes, read only while there is an
        index to keep in step (None otherwise)."""
        return self._stamp_now(conn) if self._index is not None else None

    def _follow(self, conn: sqlite.Connection, before: int | None) -> None:
        """After this process's own write, which the index already holds: the index is
        current if it was current before the write. A rollback restores the old stamp,
        which then no longer matches, so the index is rebuilt at the next recall."""
        if before is not None and self._stamp == before:
            self._stamp = self._stamp_now(conn)

    # -- the vector layer --------------------------------------------------------------

    def _ensure_index(self, backfill: bool = True) -> VectorIndex:
        """The index, rebuilt when another process changed the stored embeddings.

        ``backfill`` embeds memories stored without an embedding first; it writes, so it
        must not run inside another transaction.
        """
        stamp = self._stamp_now()
        if self._index is None or stamp != self._stamp:
            if backfill:
                self._backfill()
                stamp = self._stamp_now()
            # The stamp is read before the rows: a write landing in between makes the
            # next recall rebuild again, never leaves the index behind unnoticed.
            rows = self._store.query("SELECT id, embedding FROM memories WHERE"
                                     " embedding_model = ?", (EMBEDDING_MODEL,))
            ids, matrix = load_vectors((r[0], r[1]) for r in rows)
            # Past the exact threshold the HNSW graph builds in the background: unlock
            # does not wait for it, and searches stay exact until it is ready.
            self._index = VectorIndex(VectorIndexConfig(background=True))
            if len(ids):
                self._index.add(ids, matrix)
            self._stamp = stamp
        return self._index

    def _backfill(self) -> None:
        """Embed memories stored before the embedder was on."""
        if self._embedder is None:
            return
        rows = self._store.query("SELECT id, text FROM memories WHERE embedding IS NULL")
        for start in range(0, len(rows), 64):
            chunk = rows[start:start + 64]
            vectors = self._embedder.embed([r["text"] for r in chunk])
            with self._store.transaction() as c:
                c.executemany(
                    "UPDATE memories SET embedding = ?, embedding_model = ? WHERE id = ?",
                    [(encode_vector(v), EMBEDDING_MODEL, r["id"]) for r, v in zip(
                        chunk, vectors, strict=True)])

    def add(self, text: str, kind: str = "note", provenance: dict[str, Any] | None = None
            ) -> Memory:
        """Store a memory and return it.

        Raises:
            InvalidInputError: empty or oversized text, or an unknown kind.
        """
        self.prepare()
        with self._store.transaction() as c:
            mid = self.insert(c, text, kind, provenance or {"source": "manual"})
        _log.info("memory %d stored (kind %s)", mid, kind)
        memory = self.get(mid)
        if memory is None:  # pragma: no cover - deleted by another process in between
            raise InvalidInputError(f"memory #{mid} vanished")
        return memory

    def get(self, memory_id: int) -> Memory | None:
        """One memory by id, or None."""
        rows = self._store.query(f"SELECT {_COLUMNS} FROM memories WHERE id = ?",  # noqa: S608
                                 (memory_id,))
        return _row_to_memory(rows[0]) if rows else None

    def all(self, kind: str | None = None, limit: int | None = None) -> list[Memory]:
        """Memories, newest first, optionally of one kind."""
        sql = f"SELECT {_COLUMNS} FROM memories"  # noqa: S608
        params: tuple[Any, ...] = ()
        if kind is not None:
            sql += " WHERE kind = ?"
            params = (kind,)
        sql += " ORDER BY id DESC"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [_row_to_memory(r) for r in self._store.query(sql, params)]

    def _specific_words(self, query: str) -> str:
        """``query`` without the words that most memories contain (on larger stores)."""
        total = self.count()
        chunks = query.split()
        if total < COMMON_WORD_MIN_MEMORIES or not chunks:
            return query
        self._store.conn.execute("CREATE VIRTUAL TABLE IF NOT EXISTS temp.memories_vocab"
                                 " USING fts5vocab(main, memories_fts, row)")
        tokens = {c: _fold(c) for c in chunks}
        terms = sorted({t for ts in tokens.values() for t in ts})
        if not terms:
            return query
        if abs(total - self._df_total) > _DF_REFRESH_SHARE * total:
            self._df, self._df_total = {}, total
        missing = [t for t in terms if t not in self._df]
        if missing:
            marks = ", ".join("?" * len(missing))
            found = {r[0]: int(r[1]) for r in self._store.query(
                f"SELECT term, doc FROM temp.memories_vocab WHERE term IN ({marks})",  # noqa: S608
                tuple(missing))}
            self._df.update({t: found.get(t, 0) for t in missing})
        df = self._df
        limit = max(COMMON_WORD_SHARE * total, COMMON_WORD_MIN_DOCS)
        kept = [c for c in chunks if any(df.get(t, 0) <= limit for t in tokens[c])]
        return " ".join(kept)

    def search(self, query: str, limit: int = 10) -> list[MemoryHit]:
        """Keyword search over memories, best match first (BM25)."""
        match = fts_query(self._specific_words(query))
        if match is None:
            return []
        # Rank inside FTS5 first, then join only the winners: joining every match before
        # sorting reads each matching row (embedding included) and was 10x slower at 100k.
        rows = self._store.query(
            f"SELECT {_M_COLUMNS}, f.rank AS rank FROM (SELECT rowid, rank FROM memories_fts"  # noqa: S608
            " WHERE memories_fts MATCH ? ORDER BY rank LIMIT ?) AS f"
            " JOIN memories m ON m.id = f.rowid ORDER BY f.rank",
            (match, int(limit)),
        )
        return [MemoryHit(_row_to_memory(r), -float(r["rank"])) for r in rows]

    def prepare(self) -> None:
        """Build the vector index now (it embeds and writes, so not inside a transaction)."""
        if self._embedder is not None:
            self._ensure_index()

    def recall(self, query: str, k: int = 5, vector: np.ndarray | None = None
               ) -> list[MemoryHit]:
        """Hybrid recall: semantic and keyword rankings fused by rank, then time decay.

        Args:
            query: the text to recall memories for.
            k: how many memories at most.
            vector: the query's embedding, when the caller has it already; None embeds
                ``query`` with the pod's embedder.

        Without an embedder (and no ``vector``) this is keyword search alone.
        """
        if vector is None and self._embedder is None:
            return self.search(query, limit=k)
        index = self._ensure_index()
        if vector is None and len(index):  # with no memory embedded, it would find nothing
            vector = self._embed(query)
        if vector is None:
            return self.search(query, limit=k)
        pool = max(4 * k, 20)
        semantic = [mid for mid, score in index.search(vector, pool)
                    if score >= MIN_SIMILARITY]
        keyword = [h.memory.id for h in self.search(query, limit=pool)]
        ids = sorted(set(semantic) | set(keyword))
        if not ids:
            return []
        rows = {r["id"]: r for r in self._store.query(
            f"SELECT {_COLUMNS} FROM memories WHERE id IN ({', '.join('?' * len(ids))})",  # noqa: S608
            tuple(ids))}
        now = datetime.now(UTC)
        ages = {mid: _age_seconds(rows[mid]["updated_at"], now) if mid in rows else 0.0
                for mid in ids}
        fused = fuse_with_decay([semantic, keyword], ages, HALF_LIFE_S, floor=DECAY_FLOOR)
        return [MemoryHit(_row_to_memory(rows[mid]), score) for mid, score in fused[:k]
                if mid in rows]

    def forget(self, memory_id: int) -> bool:
        """Erase a memory from the table, the keyword index and the file pages.

        Returns False when no memory has that id.
        """
        with self._store.transaction() as c:
            if not self.delete(c, memory_id):
                return False
            _audit.append(c, "erasure", detail={"table": "memories", "rows": 1})
        for action in self._on_erase:
            action()
        _log.info("memory %d erased", memory_id)
        return True

    def count(self) -> int:
        """How many memories are stored."""
        return int(self._store.query("SELECT count(*) FROM memories")[0][0])
