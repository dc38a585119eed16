"""The pod's vector memory: an in-memory cosine index over memory embeddings.

Vectors are unit float32 rows, so cosine similarity is a dot product. A small index is
searched exactly, with one matrix-vector product over a contiguous matrix. Past
``exact_threshold`` vectors the index becomes an HNSW graph (hnswlib, inner-product
space), built from the vectors it holds at that moment; it turns back into an exact index
when removals bring it under half the threshold, so sizes near the threshold do not
rebuild the graph over and over.

The index lives in memory only: it is rebuilt from the encrypted store on unlock (see
:func:`load_vectors`) and nothing is ever written to disk, so embeddings, which can be
inverted into text, never sit in a plaintext file.

An HNSW graph built with ``threads == 1`` is deterministic for a given ``seed``; more
threads build faster but insert in an order that varies from run to run.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import hnswlib
import numpy as np

from covey.errors import InvalidInputError

__all__ = ["DIMENSION", "VectorIndex", "VectorIndexConfig", "encode_vector", "load_vectors"]

DIMENSION = 384
# A stored embedding is float32 little-endian, whatever the machine's byte order.
_STORED = np.dtype("<f4")
# float32 rounding leaves a unit vector's norm within ~1e-6 of 1; anything further off is
# not normalised, and its dot products would not be cosines.
_UNIT_TOLERANCE = 1e-3
_MAX_ID = 2**63 - 1
# The exact matrix grows by this factor, so n adds cost O(n) copies in all.
_GROWTH = 1.5
_MIN_CAPACITY = 256

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VectorIndexConfig:
    """How the vector index searches and when it switches to HNSW.

    Args:
        dimension: length of every vector.
        exact_threshold: largest size searched exactly; one more vector builds the HNSW
            graph. 0 means HNSW from the first vector.
        m: HNSW links per node (hnswlib's ``M``): more links, better recall, more memory.
        ef_construction: HNSW candidate list while building: higher builds a better graph,
            more slowly.
        ef_search: HNSW candidate list while searching (raised to ``k`` when smaller):
            the recall/latency trade-off. The default keeps recall@10 against exact search
            near 0.99 on 100k vectors harder to search than MiniLM's (benchmark ``recall``).
        compact_ratio: the HNSW graph is rebuilt without its removed nodes once they
            outnumber this fraction of the live ones (hnswlib only marks them deleted).
        threads: threads that build the HNSW graph; 1 makes the graph deterministic.
        seed: hnswlib's random seed (the level of each inserted node).
        background: build the graph on a background thread when the threshold is
            passed; searches stay exact (and correct) until it is ready, and the writes
            made meanwhile are replayed into it. The pod uses this so that unlocking a
            store of 100k memories does not wait for the graph.
    """

    dimension: int = DIMENSION
    exact_threshold: int = 20_000
    m: int = 16
    ef_construction: int = 100
    ef_search: int = 128
    compact_ratio: float = 0.25
    threads: int = 1
    seed: int = 0
    background: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.dimension <= 65_536:
            raise ValueError(f"vector dimension must be in 1..65536, got {self.dimension}")
        if self.exact_threshold < 0:
            raise ValueError(f"exact_threshold must be >= 0, got {self.exact_threshold}")
        # hnswlib's own bounds: M above ~100 only wastes memory, below 2 breaks the graph.
        if not 2 <= self.m <= 128:
            raise ValueError(f"HNSW m must be in 2..128, got {self.m}")
        if not 1 <= self.ef_construction <= 10_000:
            raise ValueError(
                f"HNSW ef_construction must be in 1..10000, got {self.ef_construction}")
        if not 1 <= self.ef_search <= 10_000:
            raise ValueError(f"HNSW ef_search must be in 1..10000, got {self.ef_search}")
        if not 0.0 < self.compact_ratio <= 10.0:
            raise ValueError(f"compact_ratio must be in (0, 10], got {self.compact_ratio}")
        if not 1 <= self.threads <= 256:
            raise ValueError(f"threads must be in 1..256, got {self.threads}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in 0..2**32-1, got {self.seed}")


# -- stored form ------------------------------------------------------------------------


def encode_vector(vector: np.ndarray | Sequence[float], dimension: int = DIMENSION) -> bytes:
    """The BLOB form of an embedding: ``dimension`` float32 values, little-endian.

    Raises:
        InvalidInputError: the vector has the wrong shape or a non-finite value.
    """
    v = np.asarray(vector, dtype=np.float64)
    if v.shape != (dimension,):
        raise InvalidInputError(f"an embedding has shape ({dimension},), got {v.shape}")
    if not np.isfinite(v).all():
        raise InvalidInputError("an embedding holds a NaN or infinite value")
    return v.astype(_STORED).tobytes()


def load_vectors(rows: Iterable[Sequence[Any]], dimension: int = DIMENSION
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``(id, embedding)`` rows into ids (n,) int64 and a float32 matrix (n, dimension).

    Rows whose embedding is NULL, not ``dimension`` float32 values, non-finite or not of
    unit length are skipped (and counted in the log): a memory without a usable embedding
    is still found by keyword search, and one bad row must not stop an unlock. Rows from
    another embedding model should be left out by the query (``embedding_model = ?``).

    Args:
        rows: pairs of an int id and a bytes-like BLOB (or None), e.g. the rows of
            ``SELECT id, embedding FROM memories``.
        dimension: values per embedding.
    """
    size = dimension * _STORED.itemsize
    ids: list[int] = []
    blobs: list[bytes] = []
    skipped = 0
    for row in rows:
        blob = row[1]
        if blob is None or len(blob) != size:
            skipped += 1
            continue
        ids.append(int(row[0]))
        blobs.append(bytes(blob))
    matrix = np.frombuffer(b"".join(blobs), dtype=_STORED).reshape(len(blobs), dimension)
    matrix = matrix.astype(np.float32)  # a writable, native-order copy (n, dimension)
    keep = _usable_rows(matrix)
    skipped += int((~keep).sum())
    if skipped:
        _log.warning("%d stored embeddings are missing or unusable; skipped", skipped)
    return np.asarray(ids, dtype=np.int64)[keep], np.ascontiguousarray(matrix[keep])


def _usable_rows(matrix: np.ndarray) -> np.ndarray:
    """A boolean mask of the rows that are finite and of unit length."""
    # Squared norms in float32 (no float64 copy of a 100k-row matrix); an overflow or a NaN
    # shows up as a non-finite norm.
    with np.errstate(invalid="ignore", over="ignore"):
        squared = np.einsum("ij,ij->i", matrix, matrix)  # (n,)
    return np.isfinite(squared) & (np.abs(squared - 1.0) <= 2 * _UNIT_TOLERANCE)


# -- the index --------------------------------------------------------------------------


class VectorIndex:
    """Cosine search over unit vectors keyed by memory id; exact when small, HNSW when large.

    Adding an id that is already present replaces its vector. The methods take a lock, so
    one index may be shared by threads.
    """

    def __init__(self, config: VectorIndexConfig | None = None) -> None:
        self._config = config or VectorIndexConfig()
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        """Empty exact state."""
        d = self._config.dimension
        self._matrix = np.empty((0, d), dtype=np.float32)  # (capacity, d); rows [0, n) live
        self._ids = np.empty(0, dtype=np.int64)  # (capacity,)
        self._rows: dict[int, int] = {}  # id -> row of _matrix
        self._hnsw: Any = None  # an hnswlib.Index once past the threshold
        self._live: set[int] = set()  # ids in the graph, not marked deleted
        self._tombstones: set[int] = set()  # ids in the graph, marked deleted
        # While a background build runs: the writes made since its snapshot, in order.
        self._journal: list[tuple[str, np.ndarray, np.ndarray | None]] | None = None
        self._builder: threading.Thread | None = None

    @property
    def config(self) -> VectorIndexConfig:
        """The configuration the index was created with."""
        return self._config

    @property
    def mode(self) -> str:
        """``"exact"`` or ``"hnsw"``: how searches are answered now."""
        return "exact" if self._hnsw is None else "hnsw"

    @property
    def building(self) -> bool:
        """Whether a background HNSW build is running."""
        return self._journal is not None

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait for a background build to finish; True when none is running."""
        builder = self._builder
        if builder is not None:
            builder.join(timeout)
        return not self.building

    def __len__(self) -> int:
        return len(self._rows) if self._hnsw is None else len(self._live)

    def __contains__(self, memory_id: object) -> bool:
        if not isinstance(memory_id, int | np.integer):
            return False
        key = int(memory_id)
        return key in self._rows if self._hnsw is None else key in self._live

    # -- writes -------------------------------------------------------------------------

    def add(self, ids: Sequence[int] | np.ndarray, vectors: np.ndarray) -> None:
        """Add or replace vectors.

        Args:
            ids: memory ids, distinct, 0 <= id < 2**63.
            vectors: unit rows, shape (len(ids), dimension).

        Raises:
            InvalidInputError: bad ids, wrong shape, non-finite or non-unit vectors.
        """
        keys = _check_ids(ids)
        rows = self._check_vectors(vectors, len(keys))
        if len(keys) == 0:
            return
        with self._lock:
            if self._hnsw is None:
                self._add_exact(keys, rows)
                if self._journal is not None:
                    self._journal.append(("add", keys, rows))
                elif len(self._rows) > self._config.exact_threshold:
                    if self._config.background:
                        self._start_background_build()
                    else:
                        self._to_hnsw()
            else:
                self._add_hnsw(keys, rows)

    def remove(self, ids: Iterable[int]) -> int:
        """Remove vectors by id; ids not in the index are ignored. Returns how many went."""
        removed = 0
        with self._lock:
            keys = [int(raw) for raw in ids]
            if self._journal is not None:
                self._journal.append(("remove", np.asarray(keys, dtype=np.int64), None))
            for key in keys:
                if self._hnsw is None:
                    removed += self._remove_exact(key)
                elif key in self._live:
                    self._hnsw.mark_deleted(key)
                    self._live.discard(key)
                    self._tombstones.add(key)
                    removed += 1
            if self._hnsw is not None and removed:
                self._after_hnsw_removal()
        return removed

    def _add_exact(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Write rows into the matrix: existing ids in place, new ids at the end."""
        keys_list = keys.tolist()
        fresh = sum(1 for key in keys_list if key not in self._rows)
        self._reserve(len(self._rows) + fresh)
        positions = np.empty(len(keys_list), dtype=np.int64)  # (n,) matrix row of each key
        for i, key in enumerate(keys_list):
            row = self._rows.get(key)
            if row is None:
                row = len(self._rows)
                self._rows[key] = row
            positions[i] = row
        self._ids[positions] = keys
        self._matrix[positions] = rows

    def _reserve(self, needed: int) -> None:
        """Grow the exact matrix geometrically to hold ``needed`` rows."""
        capacity = len(self._ids)
        if needed <= capacity:
            return
        capacity = max(needed, int(capacity * _GROWTH), _MIN_CAPACITY)
        n = len(self._rows)
        matrix = np.empty((capacity, self._config.dimension), dtype=np.float32)
        matrix[:n] = self._matrix[:n]
        ids = np.empty(capacity, dtype=np.int64)
        ids[:n] = self._ids[:n]
        self._matrix, self._ids = matrix, ids

    def _remove_exact(self, key: int) -> int:
        """Remove one id by moving the last row into its place; 1 if it was there."""
        row = self._rows.pop(key, None)
        if row is None:
            return 0
        last = len(self._rows)  # the old last row, now one past the end
        if row != last:
            moved = int(self._ids[last])
            self._matrix[row] = self._matrix[last]
            self._ids[row] = moved
            self._rows[moved] = row
        return 1

    def _new_graph(self, capacity: int) -> Any:
        """An empty hnswlib index in inner-product space."""
        cfg = self._config
        graph = hnswlib.Index(space="ip", dim=cfg.dimension)
        graph.init_index(max_elements=max(capacity, 1), M=cfg.m,
                         ef_construction=cfg.ef_construction, random_seed=cfg.seed)
        graph.set_ef(cfg.ef_search)
        return graph

    def _build_graph(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Replace the index's state by an HNSW graph over ``rows``."""
        graph = self._new_graph(int(len(keys) * _GROWTH))
        graph.add_items(rows, keys, num_threads=self._config.threads)
        self._hnsw = graph
        self._live = set(keys.tolist())
        self._tombstones = set()

    def _to_hnsw(self) -> None:
        """Move every vector of the exact matrix into a new HNSW graph."""
        n = len(self._rows)
        _log.info("vector index: %d vectors, building HNSW", n)
        self._build_graph(self._ids[:n].copy(), self._matrix[:n])
        d = self._config.dimension
        # The graph keeps its own copy; holding both would double the memory.
        self._matrix = np.empty((0, d), dtype=np.float32)
        self._ids = np.empty(0, dtype=np.int64)
        self._rows = {}

    def _start_background_build(self) -> None:
        """Snapshot the exact vectors and build their graph on a thread (lock held)."""
        n = len(self._rows)
        keys, rows = self._ids[:n].copy(), self._matrix[:n].copy()
        self._journal = []
        _log.info("vector index: %d vectors, building HNSW in the background", n)
        self._builder = threading.Thread(target=self._build_in_background, args=(keys, rows),
                                         name="covey-hnsw-build", daemon=True)
        self._builder.start()

    def _build_in_background(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Build without the lock, then replay the writes made meanwhile and switch."""
        try:
            graph = self._new_graph(int(len(keys) * _GROWTH))
            graph.add_items(rows, keys, num_threads=self._config.threads)
        except Exception:  # the exact index keeps answering; the next add tries again
            _log.exception("vector index: background HNSW build failed")
            with self._lock:
                self._journal = None
            return
        with self._lock:
            journal, self._journal = self._journal or [], None
            exact = (self._matrix, self._ids, self._rows)
            self._hnsw, self._live, self._tombstones = graph, set(keys.tolist()), set()
            for op, ids, vectors in journal:
                if op == "add" and vectors is not None:
                    self._add_hnsw(ids, vectors)
                else:
                    for key in ids.tolist():
                        if key in self._live:
                            graph.mark_deleted(key)
                            self._live.discard(key)
                            self._tombstones.add(key)
            if len(self._live) != len(exact[2]):  # cannot happen; never serve a wrong index
                _log.error("vector index: background build disagrees; staying exact")
                self._hnsw, self._live, self._tombstones = None, set(), set()
                return
            d = self._config.dimension
            self._matrix = np.empty((0, d), dtype=np.float32)
            self._ids = np.empty(0, dtype=np.int64)
            self._rows = {}
            if self._tombstones:
                self._after_hnsw_removal()
        _log.info("vector index: HNSW ready with %d vectors", len(self._live))

    def _add_hnsw(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Insert or update vectors in the graph, growing it first when full."""
        graph = self._hnsw
        keys_list = keys.tolist()
        fresh = sum(1 for k in keys_list if k not in self._live and k not in self._tombstones)
        needed = graph.element_count + fresh
        if needed > graph.max_elements:
            graph.resize_index(max(needed, int(graph.max_elements * _GROWTH)))
        # A marked-deleted id is revived and updated in place by hnswlib's add (the pod's
        # ids can be reused: SQLite hands out max(id) + 1 again after the last row goes).
        graph.add_items(rows, keys, num_threads=self._config.threads)
        self._live.update(keys_list)
        self._tombstones.difference_update(keys_list)

    def _after_hnsw_removal(self) -> None:
        """Fall back to exact search when small again; drop removed nodes when many."""
        live = len(self._live)
        if live <= self._config.exact_threshold // 2:
            keys, rows = self._live_vectors()
            self._reset()
            if live:
                self._add_exact(keys, rows)
            _log.info("vector index: %d vectors, back to exact search", live)
        elif len(self._tombstones) > self._config.compact_ratio * live:
            keys, rows = self._live_vectors()
            _log.info("vector index: rebuilding HNSW without %d removed vectors",
                      len(self._tombstones))
            self._build_graph(keys, rows)

    def _live_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """The ids and vectors of the graph's live nodes, ids ascending."""
        keys = np.array(sorted(self._live), dtype=np.int64)
        if len(keys) == 0:
            return keys, np.empty((0, self._config.dimension), dtype=np.float32)
        rows = np.asarray(self._hnsw.get_items(keys, return_type="numpy"), dtype=np.float32)
        return keys, rows

    # -- search -------------------------------------------------------------------------

    def search(self, query: np.ndarray, k: int = 10) -> list[tuple[int, float]]:
        """The ``k`` ids most similar to ``query``, with cosine similarities, best first.

        Equal similarities are ordered by id. Fewer than ``k`` come back when the index
        holds fewer.

        Raises:
            InvalidInputError: ``k`` < 1, or the query is not a finite unit vector.
        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise InvalidInputError(f"k must be a positive integer, got {k!r}")
        q = self._check_vectors(np.asarray(query).reshape(1, -1), 1)[0]  # (d,)
        with self._lock:
            k = min(int(k), len(self))
            if k == 0:
                return []
            if self._hnsw is None:
                keys, scores = self._search_exact(q, k)
            else:
                keys, scores = self._search_hnsw(q, k)
        order = np.lexsort((keys, -scores))
        return [(int(keys[i]), float(scores[i])) for i in order]

    def _search_exact(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` by one matrix-vector product (unordered)."""
        n = len(self._rows)
        # einsum rather than `@`: a matrix-vector product sent to a multithreaded BLAS
        # wakes its thread pool, whose spinning threads then slow the SQLite query and the
        # embedder that run next (8 ms instead of 0.3 ms at 10k on a busy 2-core machine).
        scores = np.einsum("ij,j->i", self._matrix[:n], q)  # (n,)
        if k < n:
            top = np.argpartition(scores, n - k)[n - k:]  # (k,)
            return self._ids[top], scores[top]
        return self._ids[:n].copy(), scores

    def _search_hnsw(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` from the graph (unordered)."""
        graph = self._hnsw
        ef = max(self._config.ef_search, k)
        while True:
            graph.set_ef(ef)
            try:
                labels, distances = graph.knn_query(q, k=k, num_threads=1)
                break
            except RuntimeError:
                # hnswlib raises when the search ends with fewer than k live nodes, which
                # removed nodes can cause; a longer candidate list finds the rest.
                if ef >= len(self._live) + len(self._tombstones):
                    return self._search_brute(q, k)
                ef = min(ef * 4, len(self._live) + len(self._tombstones))
            finally:
                graph.set_ef(self._config.ef_search)
        # The "ip" space's distance is 1 - dot.
        return labels[0].astype(np.int64), (1.0 - distances[0]).astype(np.float32)

    def _search_brute(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact search over the graph's live vectors: the last resort of a broken graph."""
        keys, rows = self._live_vectors()
        scores = np.einsum("ij,j->i", rows, q)  # (n,)
        top = np.argsort(-scores, kind="stable")[:k]
        return keys[top], scores[top]

    # -- validation ---------------------------------------------------------------------

    def _check_vectors(self, vectors: np.ndarray, count: int) -> np.ndarray:
        """``vectors`` as contiguous float32 (count, dimension), checked to be unit rows."""
        d = self._config.dimension
        rows = np.asarray(vectors)
        if rows.ndim != 2 or rows.shape != (count, d):
            raise InvalidInputError(f"vectors must have shape ({count}, {d}), got {rows.shape}")
        if not np.issubdtype(rows.dtype, np.floating):
            raise InvalidInputError(f"vectors must be floating point, got {rows.dtype}")
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if not _usable_rows(rows).all():
            raise InvalidInputError("vectors must be finite and of unit length")
        return rows


def _check_ids(ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """``ids`` as int64 (n,), checked to be distinct and in 0..2**63-1."""
    raw = np.asarray(ids)
    if raw.ndim != 1:
        raise InvalidInputError(f"ids must be one-dimensional, got shape {raw.shape}")
    if raw.size and not np.issubdtype(raw.dtype, np.integer):
        raise InvalidInputError(f"ids must be integers, got {raw.dtype}")
    if raw.size and (raw.min() < 0 or raw.max() > _MAX_ID):
        raise InvalidInputError("ids must be in 0..2**63-1")
    keys = raw.astype(np.int64)
    if len(np.unique(keys)) != len(keys):
        raise InvalidInputError("ids must be distinct within one add")
    return keys
