"""Benchmark ``recall``: memory retrieval latency at 1k, 10k and 100k memories, and insert speed.

For each size a real SQLCipher store (``covey.device.store._store.Store``, random 256-bit key)
is filled with generated memories and their embeddings, closed, and opened again as after
an unlock: the embeddings are read and decoded (``load_vectors``) and the vector index is
built, both timed. Then each retrieval method answers the same queries, timed one by one:

- ``exact``: exact vector search (the baseline of every ratio);
- ``hnsw``: the HNSW graph, where the size is past the exact threshold, and forced at the
  ``forced_hnsw_sizes`` to compare with exact search at the same size;
- ``fts``: the product's keyword search, ``Memories.search`` (``fts_query`` and FTS5 BM25);
- ``hybrid``: the product's recall, ``Memories.recall`` given the query's embedding:
  vector and keyword candidates (the pod's own index: exact or HNSW by size), fused by
  rank with time decay, the winners read from the store.

The unlock is the product's too: ``Memories.prepare`` reads and decodes the stored
embeddings and builds the index, as the first recall after an unlock does.

Query embedding is not in these latencies: it is timed on its own, with the ONNX MiniLM
embedder, one query text at a time. Insert throughput embeds real (generated) texts with
that embedder and writes each memory with its embedding, one durable transaction per
memory and in batches, adding it to the vector index too.

The stored embeddings are synthetic: a shared direction plus a random image of a
24-dimensional Gaussian, plus noise, so that, like MiniLM's, pairs have a mean cosine near
0.2 and the data has a low intrinsic dimension. HNSW recall on them is lower than on real
MiniLM embeddings at the same settings, so the recall figure is conservative. Uniform
random unit vectors would have no near neighbours at all, and no recall to speak of.

All text is generated from a fixed vocabulary with a seeded RNG; no user data is involved.
"""

from __future__ import annotations

import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from itertools import accumulate
from pathlib import Path
from typing import Any

import numpy as np

from covey._tempdirs import temporary_directory
from covey.device import (
    DECAY_FLOOR,
    DIMENSION,
    EMBEDDING_MODEL,
    HALF_LIFE_S,
    MEMORY_KINDS,
    Memories,
    Store,
    TextEmbedder,
    VectorIndex,
    VectorIndexConfig,
    encode_vector,
    fts_query,
    load_vectors,
    new_data_key,
)
from covey.simulations.bench._store import VOCABULARY

__all__ = ["FULL", "QUICK", "RecallBenchConfig", "run"]

TARGET_P95_MS = 10.0
_LATENT = 24  # intrinsic dimension of the synthetic embeddings
_WORD_CUM_WEIGHTS = tuple(accumulate(1.0 / (rank + 1) for rank in range(len(VOCABULARY))))
_START = datetime(2025, 1, 1, tzinfo=UTC)

_INSERT = (
    "INSERT INTO memories (text, kind, embedding, embedding_model, provenance, created_at,"
    " updated_at) VALUES (?, ?, ?, ?, '{\"source\": \"bench\"}', ?, ?)"
)
_COUNT = "SELECT count(*) FROM memories_fts WHERE memories_fts MATCH ?"
_LOAD = "SELECT id, embedding FROM memories WHERE embedding_model = ?"


@dataclass(frozen=True)
class RecallBenchConfig:
    """Sizes and settings of the retrieval benchmark.

    Args:
        sizes: memories in each store.
        forced_hnsw_sizes: sizes at which HNSW is also measured below the threshold.
        queries: timed queries per method and size.
        warmup: untimed queries before each method.
        k: results returned by every method.
        fill_batch: memories per transaction while filling a store.
        real_texts: memories embedded with the real embedder for insert throughput; half
            one durable transaction each, half in batches.
        insert_batch: memories per embedding call and transaction in the batched half.
        embed_queries: query texts embedded one at a time for the embedding latency.
        count_queries: queries whose matching memories are counted (FTS5 work per query).
        seed: seeds the text, embeddings and queries.
        index: the vector index settings under test.
    """

    sizes: tuple[int, ...] = (1_000, 10_000, 100_000)
    forced_hnsw_sizes: tuple[int, ...] = (10_000,)
    queries: int = 300
    warmup: int = 30
    k: int = 10
    fill_batch: int = 2000
    real_texts: int = 2000
    insert_batch: int = 100
    embed_queries: int = 300
    count_queries: int = 50
    seed: int = 20_240_603
    # As the pod runs it: past the threshold the HNSW graph builds in the background.
    index: VectorIndexConfig = field(default_factory=lambda: VectorIndexConfig(background=True))

    def __post_init__(self) -> None:
        if not self.sizes or min(self.sizes) < self.k:
            raise ValueError(f"sizes must be at least k ({self.k})")
        if self.queries < 1 or self.warmup < 0 or self.embed_queries < 1:
            raise ValueError("queries and embed_queries must be >= 1, warmup >= 0")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.fill_batch < 1 or self.insert_batch < 1 or self.real_texts < 2:
            raise ValueError("fill_batch and insert_batch must be >= 1, real_texts >= 2")
        if self.count_queries < 0:
            raise ValueError("count_queries must be >= 0")


FULL = RecallBenchConfig()
QUICK = RecallBenchConfig(sizes=(1_000, 10_000), warmup=10, real_texts=200,
                          embed_queries=100, count_queries=50)


# -- generated workload ----------------------------------------------------------------


def _words(rng: random.Random, low: int, high: int) -> str:
    """A sentence-like run of ``low``..``high`` Zipf-distributed words."""
    words = rng.choices(VOCABULARY, cum_weights=_WORD_CUM_WEIGHTS, k=rng.randint(low, high))
    return " ".join(words).capitalize() + "."


class EmbeddingLike:
    """Synthetic unit vectors with the neighbourhood structure of sentence embeddings."""

    def __init__(self, seed: int, dimension: int = DIMENSION) -> None:
        fixed = np.random.default_rng(seed)
        # (latent, d): a random map of the latent space into the embedding space.
        self._basis = (fixed.standard_normal((_LATENT, dimension)) /
                       np.sqrt(_LATENT * dimension)).astype(np.float32)
        shared = fixed.standard_normal(dimension).astype(np.float32)
        self._shared = shared / np.linalg.norm(shared)  # (d,) the common direction
        self._rng = np.random.default_rng(seed + 1)
        self._dimension = dimension

    def rows(self, n: int) -> np.ndarray:
        """``n`` unit vectors, float32 (n, d)."""
        z = self._rng.standard_normal((n, _LATENT)).astype(np.float32)  # (n, latent)
        noise = self._rng.standard_normal((n, self._dimension)).astype(np.float32)
        x = 0.5 * self._shared + z @ self._basis + noise * (0.3 / np.sqrt(self._dimension))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _timestamp(i: int) -> str:
    """The ``i``-th creation time: a minute apart, as the store writes them."""
    return (_START + timedelta(minutes=i)).isoformat(timespec="microseconds")


def _fill(store: Store, n: int, rng: random.Random, vectors: EmbeddingLike,
          batch: int) -> float:
    """Insert ``n`` memories with synthetic embeddings; returns the seconds taken."""
    started = time.perf_counter()
    for start in range(0, n, batch):
        count = min(batch, n - start)
        rows = vectors.rows(count)
        # Labelled as the product's embeddings, so the pod's own index loads them.
        params = [
            (_words(rng, 5, 25), rng.choice(MEMORY_KINDS), encode_vector(rows[j]),
             EMBEDDING_MODEL, _timestamp(start + j), _timestamp(start + j))
            for j in range(count)
        ]
        with store.transaction() as c:
            c.executemany(_INSERT, params)
    return time.perf_counter() - started


# -- statistics ------------------------------------------------------------------------


def _percentiles(samples_s: Sequence[float]) -> dict[str, float]:
    """p50, p95 and p99 of timings, in milliseconds."""
    p50, p95, p99 = np.percentile(np.asarray(samples_s) * 1000.0, [50, 95, 99])
    return {"p50_ms": round(float(p50), 4), "p95_ms": round(float(p95), 4),
            "p99_ms": round(float(p99), 4), "mean_ms": round(statistics.fmean(samples_s)
                                                              * 1000.0, 4)}


def _timed_each(action: Callable[[int], Any], count: int, warmup: int
                ) -> tuple[list[float], list[Any]]:
    """Run ``action(i)`` for i in 0..count-1 after ``warmup`` untimed calls."""
    for i in range(min(warmup, count)):
        action(i)
    samples, outputs = [], []
    for i in range(count):
        started = time.perf_counter()
        out = action(i)
        samples.append(time.perf_counter() - started)
        outputs.append(out)
    return samples, outputs


def _recall(found: Sequence[Sequence[tuple[int, float]]],
            truth: Sequence[Sequence[tuple[int, float]]]) -> float:
    """Mean fraction of the exact top-k that an approximate search returned."""
    hits = sum(len({i for i, _ in f} & {i for i, _ in t}) for f, t in zip(found, truth,
                                                                             strict=True))
    return hits / max(1, sum(len(t) for t in truth))


# -- retrieval -------------------------------------------------------------------------


def _build(ids: np.ndarray, matrix: np.ndarray, config: VectorIndexConfig
           ) -> tuple[VectorIndex, float]:
    """A vector index over the vectors, and the seconds its build took."""
    started = time.perf_counter()
    index = VectorIndex(config)
    index.add(ids, matrix)
    return index, time.perf_counter() - started


def _measure_size(n: int, cfg: RecallBenchConfig, root: Path, embedder: TextEmbedder
                  ) -> dict[str, Any]:
    """Fill a store with ``n`` memories, reopen it, and time every method."""
    rng = random.Random(cfg.seed + n)  # noqa: S311 - reproducible filler, not a secret
    vectors = EmbeddingLike(cfg.seed)
    key = new_data_key()
    path = root / f"pod-{n}.db"
    store = Store(path, key)
    try:
        _progress(f"{n:,}: filling the store")
        fill_s = _fill(store, n, rng, vectors, cfg.fill_batch)
    finally:
        store.close()
    queries = vectors.rows(cfg.queries)  # (q, d), from the same distribution
    texts = [_words(rng, 2, 6) for _ in range(cfg.queries)]

    _progress(f"{n:,}: unlock (open, read and decode embeddings, build the index)")
    started = time.perf_counter()
    store = Store(path, key)
    open_s = time.perf_counter() - started
    try:
        memories = Memories(store, on_erase=lambda: None, embedder=embedder)
        started = time.perf_counter()
        memories.prepare()  # the pod's unlock path: read, decode, index
        build_s = time.perf_counter() - started
        default = memories.index
        assert default is not None
        background = default.building
        started = time.perf_counter()
        default.wait_ready()
        ready_s = build_s + time.perf_counter() - started
        started = time.perf_counter()
        ids, matrix = load_vectors(store.query(_LOAD, (EMBEDDING_MODEL,)))
        read_s = time.perf_counter() - started
        result: dict[str, Any] = {
            "memories": n,
            "fill_memories_per_s": round(n / fill_s, 1),
            "unlock": {"open_s": round(open_s, 4), "read_decode_s": round(read_s, 4),
                       "index_build_s": round(build_s, 4), "index_mode": default.mode,
                       "hnsw_in_background": background,
                       "index_ready_s": round(ready_s, 4)},
        }
        result.update(_measure_methods(memories, default, ids, matrix, queries, texts, cfg))
        result["fts_matches"] = _count_matches(store, texts[: cfg.count_queries])
    finally:
        store.close()
        path.unlink(missing_ok=True)
    return result


def _measure_methods(memories: Memories, default: VectorIndex, ids: np.ndarray,
                     matrix: np.ndarray, queries: np.ndarray, texts: list[str],
                     cfg: RecallBenchConfig) -> dict[str, Any]:
    """Latency of each method, ratios against exact search, and HNSW recall."""
    n, count = len(ids), cfg.queries
    exact = default
    hnsw: VectorIndex | None = default if default.mode == "hnsw" else None
    builds: dict[str, float] = {}
    if exact.mode != "exact":
        # The baseline: the same vectors searched exactly (the threshold lifted past n).
        exact, builds["exact"] = _build(ids, matrix, replace(cfg.index, exact_threshold=n,
                                                             background=False))
    if hnsw is None and n in cfg.forced_hnsw_sizes:
        _progress(f"{n:,}: building a forced HNSW index")
        hnsw, builds["hnsw"] = _build(ids, matrix, replace(cfg.index, exact_threshold=0,
                                                           background=False))
    del matrix

    methods: dict[str, Callable[[int], Any]] = {
        "exact": lambda i: exact.search(queries[i], cfg.k),
        "fts": lambda i: memories.search(texts[i], cfg.k),
        "hybrid": lambda i: memories.recall(texts[i], cfg.k, vector=queries[i]),
    }
    if hnsw is not None:
        graph = hnsw
        methods["hnsw"] = lambda i: graph.search(queries[i], cfg.k)
    latency: dict[str, dict[str, Any]] = {}
    outputs: dict[str, list[Any]] = {}
    for name in ("exact", "hnsw", "fts", "hybrid"):
        if name not in methods:
            continue
        _progress(f"{n:,}: {name} ({count} queries)")
        samples, outputs[name] = _timed_each(methods[name], count, cfg.warmup)
        latency[name] = _percentiles(samples)
    base = latency["exact"]
    for fig in latency.values():
        fig["ratio_vs_exact"] = {p: round(fig[f"{p}_ms"] / base[f"{p}_ms"], 3)
                                 for p in ("p50", "p95", "p99")}
    result: dict[str, Any] = {
        "latency": latency,
        "hybrid_vector_index": default.mode,
        "extra_index_build_s": {name: round(s, 3) for name, s in builds.items()},
    }
    if "hnsw" in outputs:
        result[f"hnsw_recall_at_{cfg.k}"] = round(_recall(outputs["hnsw"], outputs["exact"]), 4)
    return result


def _count_matches(store: Store, texts: Sequence[str]) -> dict[str, Any]:
    """How many memories the keyword queries match: the rows FTS5 ranks per query."""
    matches = [fts_query(t) for t in texts]
    counts = [int(store.query(_COUNT, (m,))[0][0]) for m in matches if m]
    if not counts:
        return {"queries": 0}
    return {"queries": len(counts), "mean": round(statistics.fmean(counts), 1),
            "median": statistics.median(counts), "max": max(counts)}


# -- real embeddings: insert throughput and query embedding ------------------------------


def _insert_one(store: Store, index: VectorIndex, text: str, vector: np.ndarray,
                model: str, i: int) -> None:
    """Write one memory with its embedding in a durable transaction and index it."""
    with store.transaction() as c:
        cur = c.execute(_INSERT, (text, "note", encode_vector(vector), model, _timestamp(i),
                                  _timestamp(i)))
        memory_id = int(cur.lastrowid or 0)
    index.add([memory_id], vector[None])


def _insert_batch(store: Store, index: VectorIndex, texts: Sequence[str], vectors: np.ndarray,
                  model: str, first: int) -> None:
    """Write memories with their embeddings in one durable transaction and index them."""
    ids = []
    with store.transaction() as c:
        for j, text in enumerate(texts):
            cur = c.execute(_INSERT, (text, "note", encode_vector(vectors[j]), model,
                                      _timestamp(first + j), _timestamp(first + j)))
            ids.append(int(cur.lastrowid or 0))
    index.add(ids, vectors)


def measure_real(cfg: RecallBenchConfig, root: Path, embedder: Any, load_s: float
                 ) -> dict[str, Any]:
    """Insert throughput with real embeddings, and query embedding latency."""
    rng = random.Random(cfg.seed)  # noqa: S311 - reproducible filler, not a secret
    texts = [_words(rng, 5, 25) for _ in range(cfg.real_texts)]
    half = len(texts) // 2
    embedder.embed(texts[:8])  # warm-up: ORT allocates its buffers on the first run

    path = root / "pod-real.db"
    store = Store(path, new_data_key())
    index = VectorIndex(cfg.index)
    try:
        _progress(f"insert: {half} memories, one transaction each")
        single_embed, single = [], []
        for i, text in enumerate(texts[:half]):
            started = time.perf_counter()
            vector = embedder.embed([text])[0]
            embedded = time.perf_counter()
            _insert_one(store, index, text, vector, embedder.name, i)
            single.append(time.perf_counter() - started)
            single_embed.append(embedded - started)
        _progress(f"insert: {len(texts) - half} memories in batches of {cfg.insert_batch}")
        batched_embed, started_all = 0.0, time.perf_counter()
        for start in range(half, len(texts), cfg.insert_batch):
            chunk = texts[start:start + cfg.insert_batch]
            started = time.perf_counter()
            vectors = embedder.embed(chunk)
            batched_embed += time.perf_counter() - started
            _insert_batch(store, index, chunk, vectors, embedder.name, start)
        batched_s = time.perf_counter() - started_all
        stored = len(index)
    finally:
        store.close()
        path.unlink(missing_ok=True)

    _progress(f"query embedding: {cfg.embed_queries} queries, one at a time")
    query_texts = [_words(rng, 2, 6) for _ in range(cfg.embed_queries)]
    samples, _ = _timed_each(lambda i: embedder.embed([query_texts[i]]), cfg.embed_queries,
                             cfg.warmup)
    return {
        "embedder": embedder.name,
        "embedder_load_s": round(load_s, 3),
        "insert": {
            "single": {
                "memories": half,
                "memories_per_s": round(half / sum(single), 1),
                "embedding_share": round(sum(single_embed) / sum(single), 3),
                "latency": _percentiles(single),
            },
            "batched": {
                "memories": len(texts) - half,
                "batch": cfg.insert_batch,
                "memories_per_s": round((len(texts) - half) / batched_s, 1),
                "embedding_share": round(batched_embed / batched_s, 3),
            },
            "indexed": stored,
        },
        "query_embedding": _percentiles(samples),
    }


# -- entry point -----------------------------------------------------------------------


def _progress(text: str) -> None:
    """Progress on stderr, so stdout stays the summary."""
    print(f"  [recall] {text}", file=sys.stderr, flush=True)


def _latency_line(n: int, name: str, fig: dict[str, Any]) -> str:
    ratio = fig["ratio_vs_exact"]
    return (f"{n:>7,} {name:<6} p50 {fig['p50_ms']:>7.3f} ms  p95 {fig['p95_ms']:>7.3f} ms"
            f"  p99 {fig['p99_ms']:>7.3f} ms   vs exact x{ratio['p50']:.3f} / x{ratio['p95']:.3f}"
            f" / x{ratio['p99']:.3f}")


def summary_lines(results: dict[str, Any], cfg: RecallBenchConfig) -> list[str]:
    """One human-readable line per figure."""
    lines = []
    for size in results["sizes"]:
        n = size["memories"]
        for name, fig in size["latency"].items():
            lines.append(_latency_line(n, name, fig))
        unlock = size["unlock"]
        extra = "".join(f", {k} index {v:.2f} s" for k, v in size["extra_index_build_s"].items())
        lines.append(
            f"{n:>7,} unlock: open {unlock['open_s']:.3f} s, read+decode"
            f" {unlock['read_decode_s']:.3f} s, searchable after"
            f" {unlock['index_build_s']:.2f} s, {unlock['index_mode']} index ready after"
            f" {unlock['index_ready_s']:.2f} s{extra}"
        )
        recall = size.get(f"hnsw_recall_at_{cfg.k}")
        fts = size["fts_matches"]
        note = f"hnsw recall@{cfg.k} {recall:.4f}; " if recall is not None else ""
        if fts["queries"]:
            note += (f"keyword queries match {fts['mean']:,.0f} memories on average"
                     f" ({fts['mean'] / n:.0%}), hybrid vector part: {size['hybrid_vector_index']}")
        lines.append(f"{n:>7,} {note}")
    largest = results["sizes"][-1]
    hybrid = largest["latency"]["hybrid"]["p95_ms"]
    verdict = "within" if hybrid < TARGET_P95_MS else "OVER"
    lines.append(f"hybrid p95 at {largest['memories']:,}: {hybrid:.2f} ms"
                 f" ({verdict} the {TARGET_P95_MS:g} ms target)")
    real = results["real"]
    single, batched = real["insert"]["single"], real["insert"]["batched"]
    lines.append(
        f"insert with embedding: single {single['memories_per_s']:.1f} memories/s"
        f" (p50 {single['latency']['p50_ms']:.1f} ms, {single['embedding_share']:.0%} embedding)"
        f", batched x{batched['batch']} {batched['memories_per_s']:.1f} memories/s"
        f" ({batched['embedding_share']:.0%} embedding)"
    )
    q = real["query_embedding"]
    lines.append(f"query embedding (excluded above): p50 {q['p50_ms']:.2f} ms"
                 f"  p95 {q['p95_ms']:.2f} ms")
    return lines


def run(quick: bool = False, cfg: RecallBenchConfig | None = None) -> dict[str, Any]:
    """Run the retrieval benchmark; returns ``config``, ``results`` and ``summary``."""
    from covey.models import create_embedder

    cfg = cfg or (QUICK if quick else FULL)
    _progress("loading the ONNX embedder")
    started = time.perf_counter()
    embedder = create_embedder("minilm-onnx")
    load_s = time.perf_counter() - started
    with temporary_directory("covey-bench-") as tmp:
        root = Path(tmp)
        sizes = [_measure_size(n, cfg, root, embedder) for n in cfg.sizes]
        real = measure_real(cfg, root, embedder, load_s)
    results = {"sizes": sizes, "real": real}
    config = {**asdict(cfg), "tmp_dir": tempfile.gettempdir(),
              "recall": {"half_life_days": HALF_LIFE_S / 86_400, "decay_floor": DECAY_FLOOR},
              "vectors": f"synthetic, {_LATENT}-dimensional latent, unit {DIMENSION}-d"}
    return {"config": config, "results": results, "summary": summary_lines(results, cfg)}
