"""The vector index: exact search, removals, the switch to HNSW, and stored embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from covey.device.memory._vector import (
    DIMENSION,
    VectorIndex,
    VectorIndexConfig,
    encode_vector,
    load_vectors,
)
from covey.errors import InvalidInputError

DIM = 32  # small vectors keep the exact tests fast; the HNSW tests use the real 384


def unit_rows(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    """``n`` random unit vectors, float32 (n, dim)."""
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def embedding_like_rows(rng: np.random.Generator, n: int, dim: int = DIMENSION) -> np.ndarray:
    """Unit vectors with the neighbourhood structure of sentence embeddings.

    A shared direction plus a random image of a 24-dimensional Gaussian, plus noise: as
    MiniLM's, pairs have a mean cosine near 0.2 and the data has a low intrinsic dimension
    (recall at a given ef is, if anything, lower than on real embeddings). Uniform random
    vectors in 384 dimensions have no near neighbours at all, which no approximate index,
    and no real embedder, meets.
    """
    fixed = np.random.default_rng(7)
    basis = fixed.standard_normal((24, dim)).astype(np.float32) / np.sqrt(24 * dim)
    shared = unit_rows(fixed, 1, dim)[0]
    z = rng.standard_normal((n, 24)).astype(np.float32)
    noise = rng.standard_normal((n, dim)).astype(np.float32) * (0.3 / np.sqrt(dim))
    x = 0.5 * shared + z @ basis + noise
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_force(ids: np.ndarray, rows: np.ndarray, q: np.ndarray, k: int
                ) -> list[tuple[int, float]]:
    scores = rows @ q
    order = sorted(range(len(ids)), key=lambda i: (-scores[i], ids[i]))[:k]
    return [(int(ids[i]), float(scores[i])) for i in order]


def assert_same(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    assert [i for i, _ in got] == [i for i, _ in want]
    assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-5)


def test_exact_search_equals_brute_force() -> None:
    rng = np.random.default_rng(1)
    rows = unit_rows(rng, 1000)
    ids = rng.permutation(10_000)[:1000] + 1
    index = VectorIndex(VectorIndexConfig(dimension=DIM))
    for start in range(0, 1000, 137):  # several adds: the matrix grows in steps
        index.add(ids[start:start + 137], rows[start:start + 137])
    assert len(index) == 1000 and index.mode == "exact"
    for q in unit_rows(rng, 20):
        assert_same(index.search(q, 10), brute_force(ids, rows, q, 10))
    assert len(index.search(unit_rows(rng, 1)[0], 5000)) == 1000


def test_exact_removal_and_replacement() -> None:
    rng = np.random.default_rng(2)
    rows = unit_rows(rng, 300)
    ids = np.arange(1, 301)
    index = VectorIndex(VectorIndexConfig(dimension=DIM))
    index.add(ids, rows)
    gone = ids[::3]
    assert index.remove([*gone.tolist(), 9999]) == len(gone)
    assert index.remove(gone) == 0
    kept = np.setdiff1d(ids, gone)
    assert len(index) == len(kept) and 1 not in index and 2 in index
    for q in unit_rows(rng, 10):
        assert_same(index.search(q, 15), brute_force(kept, rows[kept - 1], q, 15))
    # Re-adding an id replaces its vector: the query equal to it finds it first.
    fresh = unit_rows(rng, 1)
    index.add([2], fresh)
    assert index.search(fresh[0], 1)[0][0] == 2
    assert len(index) == len(kept)


def test_empty_index() -> None:
    index = VectorIndex(VectorIndexConfig(dimension=DIM))
    q = unit_rows(np.random.default_rng(3), 1)[0]
    assert len(index) == 0 and index.search(q, 10) == []
    index.add([], np.empty((0, DIM), dtype=np.float32))
    assert index.remove([1, 2]) == 0 and len(index) == 0
    index.add([5], q[None])
    assert index.remove([5]) == 1 and index.search(q, 3) == []


def test_bad_input() -> None:
    index = VectorIndex(VectorIndexConfig(dimension=DIM))
    good = unit_rows(np.random.default_rng(4), 2)
    with pytest.raises(InvalidInputError, match="shape"):
        index.add([1, 2], good[:, :10])
    with pytest.raises(InvalidInputError, match="unit"):
        index.add([1, 2], good * 2)
    with pytest.raises(InvalidInputError, match="unit"):
        index.add([1, 2], np.full((2, DIM), np.nan, dtype=np.float32))
    with pytest.raises(InvalidInputError, match="distinct"):
        index.add([1, 1], good)
    with pytest.raises(InvalidInputError, match="ids must be in"):
        index.add([-1, 2], good)
    with pytest.raises(InvalidInputError, match="integers"):
        index.add([1.5, 2.5], good)
    with pytest.raises(InvalidInputError, match="k must be"):
        index.search(good[0], 0)
    with pytest.raises(InvalidInputError, match="shape"):
        index.search(good[0][:5], 1)
    assert len(index) == 0


@pytest.mark.parametrize("kwargs", [
    {"dimension": 0}, {"exact_threshold": -1}, {"m": 1}, {"ef_construction": 0},
    {"ef_search": 0}, {"compact_ratio": 0.0}, {"threads": 0}, {"seed": -1},
])
def test_config_is_validated(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        VectorIndexConfig(**kwargs)


def recall_at_10(index: VectorIndex, ids: np.ndarray, rows: np.ndarray,
                 queries: np.ndarray) -> float:
    exact = rows @ queries.T  # (n, q)
    top = np.argpartition(-exact, 10, axis=0)[:10]  # (10, q)
    hits = 0
    for j, q in enumerate(queries):
        got = {i for i, _ in index.search(q, 10)}
        hits += len(got & set(ids[top[:, j]].tolist()))
    return hits / (10 * len(queries))


@pytest.fixture(scope="module")
def large() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """30k embedding-like vectors with ids, and 100 queries from the same distribution."""
    rng = np.random.default_rng(5)
    rows = embedding_like_rows(rng, 30_000)
    return np.arange(1, 30_001), rows, embedding_like_rows(rng, 100)


@pytest.fixture(scope="module")
def switched(large: tuple[np.ndarray, np.ndarray, np.ndarray]) -> VectorIndex:
    """An index whose threshold (10k) was crossed while 30k vectors were added."""
    ids, rows, _ = large
    index = VectorIndex(VectorIndexConfig(exact_threshold=10_000, threads=2))
    index.add(ids[:8000], rows[:8000])
    assert index.mode == "exact"
    index.add(ids[8000:12_000], rows[8000:12_000])  # crosses the threshold
    assert index.mode == "hnsw" and len(index) == 12_000
    index.add(ids[12_000:], rows[12_000:])  # grows the graph past its capacity
    return index


def test_switch_to_hnsw_keeps_results(switched: VectorIndex,
                                      large: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    ids, rows, queries = large
    assert len(switched) == 30_000
    assert recall_at_10(switched, ids, rows, queries) >= 0.95
    # Each stored vector finds itself first, with similarity 1.
    for i in (0, 9999, 29_999):
        best, score = switched.search(rows[i], 3)[0]
        assert best == ids[i] and score == pytest.approx(1.0, abs=1e-4)


def test_hnsw_removal_never_returns_removed_ids(
        switched: VectorIndex, large: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    ids, rows, queries = large
    gone = set(ids[::7].tolist())
    assert switched.remove(sorted(gone)) == len(gone)
    assert switched.mode == "hnsw" and len(switched) == 30_000 - len(gone)
    for q in [*queries[:30], *rows[::997]]:
        assert not {i for i, _ in switched.search(q, 50)} & gone
    # A removed id can come back (SQLite reuses the highest id), with a new vector.
    back = int(ids[7])
    switched.add([back], rows[5][None])
    assert back in switched and switched.search(rows[5], 2)[0][1] == pytest.approx(1.0, abs=1e-4)
    assert {i for i, _ in switched.search(rows[5], 2)} == {back, int(ids[5])}


def test_hnsw_shrinks_back_to_exact() -> None:
    rng = np.random.default_rng(6)
    rows = unit_rows(rng, 400, 16)
    ids = np.arange(400)
    index = VectorIndex(VectorIndexConfig(dimension=16, exact_threshold=200, compact_ratio=0.2))
    index.add(ids, rows)
    assert index.mode == "hnsw"
    index.remove(range(0, 100))  # 100 removed nodes > 0.2 * 300 live: the graph is rebuilt
    assert index.mode == "hnsw" and len(index) == 300
    assert not {i for i, _ in index.search(rows[0], 300)} & set(range(100))
    index.remove(range(100, 300))  # 100 left: under half the threshold
    assert index.mode == "exact" and len(index) == 100
    q = unit_rows(rng, 1, 16)[0]
    assert_same(index.search(q, 10), brute_force(ids[300:], rows[300:], q, 10))


def test_hnsw_is_deterministic_for_a_seed() -> None:
    rng = np.random.default_rng(8)
    rows = unit_rows(rng, 3000, 24)
    queries = unit_rows(rng, 20, 24)
    config = VectorIndexConfig(dimension=24, exact_threshold=0, ef_search=16, seed=3)
    results = []
    for _ in range(2):
        index = VectorIndex(config)
        index.add(np.arange(3000), rows)
        results.append([index.search(q, 10) for q in queries])
    assert results[0] == results[1]


def test_threshold_zero_is_hnsw_from_the_start() -> None:
    index = VectorIndex(VectorIndexConfig(dimension=DIM, exact_threshold=0))
    rows = unit_rows(np.random.default_rng(9), 3)
    index.add([10, 20, 30], rows)
    assert index.mode == "hnsw"
    assert index.search(rows[1], 10)[0][0] == 20
    assert index.remove([10, 20, 30]) == 3
    assert len(index) == 0 and index.search(rows[0], 1) == []


# -- stored embeddings ------------------------------------------------------------------


def test_encode_and_load_round_trip() -> None:
    rows = unit_rows(np.random.default_rng(10), 3, DIMENSION)
    blobs = [encode_vector(r) for r in rows]
    assert all(len(b) == 4 * DIMENSION for b in blobs)
    assert np.frombuffer(blobs[0], dtype="<f4").tolist() == rows[0].tolist()
    ids, matrix = load_vectors([(1, blobs[0]), (2, memoryview(blobs[1])), (3, blobs[2])])
    assert ids.tolist() == [1, 2, 3] and ids.dtype == np.int64
    assert matrix.dtype == np.float32 and matrix.flags.c_contiguous
    np.testing.assert_array_equal(matrix, rows)


def test_load_vectors_skips_bad_rows(caplog: pytest.LogCaptureFixture) -> None:
    rows = unit_rows(np.random.default_rng(11), 2, DIMENSION)
    nan = np.full(DIMENSION, np.nan, dtype="<f4").tobytes()
    long = (2 * rows[0]).astype("<f4").tobytes()
    ids, matrix = load_vectors([
        (1, encode_vector(rows[0])), (2, None), (3, b"\x00" * 12), (4, nan),
        (5, long), (6, encode_vector(rows[1])), (7, encode_vector(rows[1])[:-4]),
    ])
    assert ids.tolist() == [1, 6] and matrix.shape == (2, DIMENSION)
    assert "5 stored embeddings" in caplog.text
    empty_ids, empty = load_vectors([])
    assert empty_ids.shape == (0,) and empty.shape == (0, DIMENSION)
    index = VectorIndex()
    index.add(ids, matrix)
    assert index.search(rows[1], 1)[0][0] == 6


def test_encode_vector_rejects_bad_vectors() -> None:
    with pytest.raises(InvalidInputError, match="shape"):
        encode_vector(np.zeros(10))
    with pytest.raises(InvalidInputError, match="NaN"):
        encode_vector(np.full(DIMENSION, np.inf))


def test_background_build_serves_exact_meanwhile_and_replays_writes(
        large: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    ids, rows, queries = large
    index = VectorIndex(VectorIndexConfig(exact_threshold=5000, background=True))
    reference = VectorIndex(VectorIndexConfig(exact_threshold=10**9))  # always exact
    for target in (index, reference):
        target.add(ids[:20_000], rows[:20_000])
    assert index.building and index.mode == "exact"  # add returned before the graph
    # searches during the build are exact, hence identical to the reference
    assert index.search(queries[0], 10) == reference.search(queries[0], 10)
    # writes made during the build: adds, replacements, removals
    for target in (index, reference):
        target.add(ids[20_000:25_000], rows[20_000:25_000])
        target.remove(ids[:300].tolist())
        target.add(ids[300:400], rows[25_000:25_100])  # new vectors for existing ids
        target.remove([int(ids[20_001])])
    assert index.wait_ready(timeout=300)
    assert index.mode == "hnsw" and not index.building
    assert len(index) == len(reference) == 25_000 - 300 - 1
    assert int(ids[5]) not in index and int(ids[20_001]) not in index
    assert int(ids[350]) in index
    hits = [h for q in queries for h in index.search(q, 10)]
    assert not {int(i) for i in ids[:300]} & {h[0] for h in hits}
    agree = np.mean([len({h[0] for h in index.search(q, 10)}
                         & {h[0] for h in reference.search(q, 10)}) / 10 for q in queries])
    assert agree >= 0.95  # HNSW recall@10 against exact on the same contents
    replaced = index.search(rows[25_050], 1)[0]
    assert replaced[0] == int(ids[350]) and replaced[1] == pytest.approx(1.0, abs=1e-4)
