"""Benchmark ``store``: the pod's SQLCipher store against plain SQLite, and unlock time.

Both engines are the same sqlcipher3 build with the same pragmas and schema
(``covey.device.store._store.Store``); plain SQLite is ``key=None``. Runs alternate between the
engines (the first engine swaps every repetition, so drift in disk or CPU speed hits both),
each in a fresh temporary directory (``TMPDIR`` chooses the disk). The figures are medians
over repetitions and the ratio sqlcipher / plain of those medians.

The read phases start on a freshly opened connection, as after an unlock: SQLite's page
cache is cold (so SQLCipher decrypts every page it touches once), the OS cache is warm.

All text is generated from a fixed vocabulary with a seeded RNG; no user data is involved.
"""

from __future__ import annotations

import json
import random
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from itertools import accumulate
from pathlib import Path
from typing import Any

import sqlcipher3.dbapi2 as sqlite

from covey._tempdirs import temporary_directory
from covey.device import (
    MEMORY_KINDS,
    KdfParams,
    Pod,
    PodConfig,
    Store,
    fts_query,
    new_data_key,
    unwrap,
    wrap,
)

__all__ = ["FULL", "QUICK", "StoreBenchConfig", "run"]

UNLOCK_TARGET_S = 0.5
ENGINES = ("sqlcipher", "sqlite")
PHASES = (
    "create", "messages_single", "messages_batched", "memories_single", "memories_batched",
    "reopen", "point_reads", "history_reads", "searches",
)
HISTORY_LIMIT = 20

# Everyday words, roughly in order of how often a chat would use them; drawn with Zipf
# weights so that searches meet both common words (long posting lists) and rare ones.
_VOCABULARY_TEXT = """
the i you to and a it is my of that in for me on this be have with what do was are not can
so but just about we at like your if will how get would know think go when one out time up
all there today want need good more some tomorrow day make should really from please help
remind week back thanks call work now also then could going did new morning tonight still
next list home night meeting later take see other after last sister brother mom dad friend
friends team doctor dentist appointment birthday party dinner lunch breakfast coffee tea
water walk run gym yoga train bus car bike flight hotel trip holiday weekend monday tuesday
wednesday thursday friday saturday sunday january february march april may june july
august september october november december email message phone text note notes idea ideas
project deadline report slides budget invoice rent bills groceries milk bread eggs cheese
apples bananas rice pasta chicken fish salad soup vegetarian vegan allergic peanuts gluten
book books read reading movie film music song playlist podcast concert guitar piano garden
plants tomatoes roses dog cat walked feed vet medicine pills headache sleep tired early late
quiet noisy city park beach mountains lake river snow rain sunny cold warm weather jacket
umbrella shoes shirt gift present card flowers cake candles recipe bake cook oven kitchen
clean laundry dishes vacuum fix broken leak plumber landlord neighbour keys door window
paint blue green red yellow favourite prefer hate love enjoy usually always never sometimes
often every hour minutes half quarter past before since until during office desk laptop
password printer meeting notes manager colleague client interview salary holiday leave sick
school homework teacher exam lesson class course language spanish french german japanese
practice vocabulary grammar chapter tickets booking reservation table restaurant pizza sushi
curry noodles burger wine beer juice anniversary wedding baby kids son daughter grandma
grandpa uncle aunt cousin visit visiting moved apartment house street address station
airport passport visa luggage packing checklist insurance bank account savings transfer pay
paid price cheap expensive discount order delivery package returned refund warranty
"""
VOCABULARY: tuple[str, ...] = tuple(dict.fromkeys(_VOCABULARY_TEXT.split()))

_WORD_CUM_WEIGHTS = tuple(accumulate(1.0 / (rank + 1) for rank in range(len(VOCABULARY))))


@dataclass(frozen=True)
class StoreBenchConfig:
    """Sizes of the store benchmark.

    Args:
        messages: messages inserted in each insert mode (single and batched).
        memories: memories inserted in each insert mode.
        batch_size: rows per transaction in the batched modes.
        point_reads: message reads by id.
        history_reads: reads of the last ``HISTORY_LIMIT`` messages of a conversation.
        searches: keyword searches over the memories.
        search_limit: hits per search.
        repetitions: runs of each engine (alternating).
        unlock_runs: timed runs of each unlock measurement.
        pod_messages: messages in the pod that ``Pod.open`` is timed on.
        pod_memories: memories in that pod.
        seed: seeds the text, the ids read and the queries.
    """

    messages: int = 3000
    memories: int = 3000
    batch_size: int = 100
    point_reads: int = 20_000
    history_reads: int = 5000
    searches: int = 500
    search_limit: int = 10
    repetitions: int = 5
    unlock_runs: int = 10
    pod_messages: int = 5000
    pod_memories: int = 2000
    seed: int = 20_240_601


FULL = StoreBenchConfig()
QUICK = StoreBenchConfig(
    messages=300, memories=300, point_reads=2000, history_reads=500, searches=200,
    repetitions=2, unlock_runs=3, pod_messages=500, pod_memories=200,
)


# -- generated workload ----------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """Everything the timed phases write and ask, generated before any timing starts."""

    messages: list[tuple[str, str, str]]  # role, content, created_at
    memories: list[tuple[str, str, str, str, str]]  # text, kind, provenance, created, updated
    point_ids: list[int]
    history_conversations: list[int]
    queries: list[str]  # FTS5 match expressions, as the product builds them

    def head(self, n: int) -> Workload:
        """A smaller workload with the first ``n`` items of each list (for warm-up)."""
        return Workload(
            self.messages[:n], self.memories[:n], [i for i in self.point_ids if i <= n][:n],
            self.history_conversations[:n], self.queries[:n],
        )


def _words(rng: random.Random, low: int, high: int) -> str:
    """A sentence-like run of ``low``..``high`` Zipf-distributed words."""
    words = rng.choices(VOCABULARY, cum_weights=_WORD_CUM_WEIGHTS, k=rng.randint(low, high))
    return " ".join(words).capitalize() + "."


def _timestamps(count: int) -> list[str]:
    """Increasing ISO timestamps, a minute apart, as the store writes them."""
    start = datetime(2025, 1, 1, tzinfo=UTC)
    return [(start + timedelta(minutes=i)).isoformat(timespec="microseconds")
            for i in range(count)]


def make_workload(cfg: StoreBenchConfig) -> Workload:
    """Generate the messages, memories, read ids and queries for one configuration."""
    # Reproducible filler text, not secrets: a seeded non-cryptographic RNG is the point.
    rng = random.Random(cfg.seed)  # noqa: S311
    total_messages = 2 * cfg.messages
    times = _timestamps(max(total_messages, 2 * cfg.memories))
    messages = []
    for i in range(total_messages):
        # Users write short turns, the assistant answers at more length.
        role, text = ("user", _words(rng, 3, 25)) if i % 2 == 0 else (
            "assistant", _words(rng, 10, 80))
        messages.append((role, text, times[i]))
    provenance = json.dumps({"source": "bench"})
    memories = [(_words(rng, 5, 25), rng.choice(MEMORY_KINDS), provenance, t, t)
                for t in times[: 2 * cfg.memories]]
    queries = [fts_query(_words(rng, 2, 6)) or '"coffee"' for _ in range(cfg.searches)]
    return Workload(
        messages=messages,
        memories=memories,
        point_ids=[rng.randint(1, total_messages) for _ in range(cfg.point_reads)],
        # Ids 1 and 2: the single and batched conversations of a fresh database.
        history_conversations=[1 + i % 2 for i in range(cfg.history_reads)],
        queries=queries,
    )


# -- timed phases ----------------------------------------------------------------------

_INSERT_CONVERSATION = "INSERT INTO conversations (session_id, title, started_at) VALUES (?, ?, ?)"
_INSERT_MESSAGE = (
    "INSERT INTO messages (conversation_id, role, content, model_version, created_at)"
    " VALUES (?, ?, ?, 'bench', ?)"
)
_INSERT_MEMORY = (
    "INSERT INTO memories (text, kind, provenance, created_at, updated_at)"
    " VALUES (?, ?, ?, ?, ?)"
)
_READ_MESSAGE = "SELECT * FROM messages WHERE id = ?"
_READ_HISTORY = (
    "SELECT * FROM messages WHERE conversation_id = ? ORDER BY id DESC LIMIT ?"
)
# The product's memory search (covey.device.memory._memory.Memories.search).
_SEARCH = (
    "SELECT m.*, bm25(memories_fts) AS rank FROM memories_fts"
    " JOIN memories m ON m.id = memories_fts.rowid"
    " WHERE memories_fts MATCH ? ORDER BY rank LIMIT ?"
)


def _timed(action: Callable[[], object]) -> float:
    """Seconds taken by ``action``."""
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def _new_conversation(store: Store, title: str) -> int:
    """Insert a conversation and return its id."""
    with store.transaction() as c:
        cur = c.execute(_INSERT_CONVERSATION, (secrets.token_hex(8), title, "2025-01-01"))
        return int(cur.lastrowid or 0)


def _insert_single(store: Store, sql: str, rows: Sequence[tuple[Any, ...]]) -> None:
    """One durable transaction per row, as a chat app saves each turn."""
    for row in rows:
        with store.transaction() as c:
            c.execute(sql, row)


def _insert_batched(store: Store, sql: str, rows: Sequence[tuple[Any, ...]],
                    batch_size: int) -> None:
    """``batch_size`` rows per transaction, as an import or a sync would write."""
    for start in range(0, len(rows), batch_size):
        with store.transaction() as c:
            c.executemany(sql, rows[start:start + batch_size])


def _message_rows(conversation: int, messages: Sequence[tuple[str, str, str]]
                  ) -> list[tuple[Any, ...]]:
    """Message rows for one conversation."""
    return [(conversation, role, text, created) for role, text, created in messages]


def _point_reads(store: Store, ids: Sequence[int]) -> None:
    """Read messages one by one by id."""
    for message_id in ids:
        store.query(_READ_MESSAGE, (message_id,))


def _history_reads(store: Store, conversations: Sequence[int]) -> None:
    """Read the recent history of conversations, as a chat view opens."""
    for conversation in conversations:
        store.query(_READ_HISTORY, (conversation, HISTORY_LIMIT))


def _searches(store: Store, queries: Sequence[str], limit: int) -> None:
    """Run the product's keyword search."""
    for match in queries:
        store.query(_SEARCH, (match, limit))


def _write_phases(store: Store, work: Workload, cfg: StoreBenchConfig) -> dict[str, float]:
    """The insert phases, on an open store."""
    half_messages = len(work.messages) // 2
    half_memories = len(work.memories) // 2
    single = _new_conversation(store, "single")
    batched = _new_conversation(store, "batched")
    single_rows = _message_rows(single, work.messages[:half_messages])
    batched_rows = _message_rows(batched, work.messages[half_messages:])
    return {
        "messages_single": _timed(lambda: _insert_single(store, _INSERT_MESSAGE, single_rows)),
        "messages_batched": _timed(lambda: _insert_batched(
            store, _INSERT_MESSAGE, batched_rows, cfg.batch_size)),
        "memories_single": _timed(lambda: _insert_single(
            store, _INSERT_MEMORY, work.memories[:half_memories])),
        "memories_batched": _timed(lambda: _insert_batched(
            store, _INSERT_MEMORY, work.memories[half_memories:], cfg.batch_size)),
    }


def _read_phases(store: Store, work: Workload, cfg: StoreBenchConfig) -> dict[str, float]:
    """The read phases, on an open store."""
    return {
        "point_reads": _timed(lambda: _point_reads(store, work.point_ids)),
        "history_reads": _timed(lambda: _history_reads(store, work.history_conversations)),
        "searches": _timed(lambda: _searches(store, work.queries, cfg.search_limit)),
    }


def run_engine(key: bytes | None, work: Workload, cfg: StoreBenchConfig) -> dict[str, float]:
    """The whole workload on a fresh database; seconds per phase."""
    with temporary_directory("covey-bench-") as tmp:
        path = Path(tmp) / "pod.db"
        started = time.perf_counter()
        store = Store(path, key)
        times = {"create": time.perf_counter() - started}
        try:
            times.update(_write_phases(store, work, cfg))
        finally:
            store.close()
        started = time.perf_counter()
        store = Store(path, key)
        times["reopen"] = time.perf_counter() - started
        try:
            times.update(_read_phases(store, work, cfg))
        finally:
            store.close()
    return times


# -- statistics ------------------------------------------------------------------------


def p95(values: Sequence[float]) -> float:
    """The 95th percentile (interpolated between samples)."""
    if len(values) < 2:
        return max(values)
    return statistics.quantiles(values, n=20, method="inclusive")[-1]


def _phase_ops(cfg: StoreBenchConfig) -> dict[str, int]:
    """How many operations each phase performs."""
    return {
        "create": 1, "reopen": 1,
        "messages_single": cfg.messages, "messages_batched": cfg.messages,
        "memories_single": cfg.memories, "memories_batched": cfg.memories,
        "point_reads": cfg.point_reads, "history_reads": cfg.history_reads,
        "searches": cfg.searches,
    }


def _compare(cipher: Sequence[float], plain: Sequence[float], ops: int) -> dict[str, Any]:
    """Medians, throughput and the sqlcipher/plain ratio of one figure."""
    med_c, med_p = statistics.median(cipher), statistics.median(plain)
    paired = [c / p for c, p in zip(cipher, plain, strict=True)]
    return {
        "ops": ops,
        "sqlcipher": {"median_s": round(med_c, 6), "ops_per_s": round(ops / med_c, 1)},
        "sqlite": {"median_s": round(med_p, 6), "ops_per_s": round(ops / med_p, 1)},
        "ratio": round(med_c / med_p, 3),
        # Per repetition, from back-to-back runs: shows how noisy the ratio is.
        "paired_ratios": [round(r, 3) for r in paired],
        "paired_ratio_median": round(statistics.median(paired), 3),
    }


def summarize_engines(runs: dict[str, list[dict[str, float]]], cfg: StoreBenchConfig
                      ) -> dict[str, Any]:
    """Per-phase and overall comparison of the two engines."""
    ops = _phase_ops(cfg)
    phases = {
        phase: _compare([r[phase] for r in runs["sqlcipher"]],
                        [r[phase] for r in runs["sqlite"]], ops[phase])
        for phase in PHASES
    }
    totals = {engine: [sum(r.values()) for r in runs[engine]] for engine in ENGINES}
    overall = _compare(totals["sqlcipher"], totals["sqlite"], 1)
    del overall["ops"]
    for engine in ENGINES:
        del overall[engine]["ops_per_s"]
    return {"phases": phases, "overall": overall}


def compare_engines(work: Workload, cfg: StoreBenchConfig) -> dict[str, list[dict[str, float]]]:
    """Run both engines ``cfg.repetitions`` times, alternating which goes first."""
    # A discarded warm-up pair: imports, first page faults and CPU clocks settle.
    for engine in ENGINES:
        run_engine(new_data_key() if engine == "sqlcipher" else None, work.head(100), cfg)
    runs: dict[str, list[dict[str, float]]] = {engine: [] for engine in ENGINES}
    for rep in range(cfg.repetitions):
        order = ENGINES if rep % 2 == 0 else ENGINES[::-1]
        for engine in order:
            _progress(f"repetition {rep + 1}/{cfg.repetitions}: {engine}")
            key = new_data_key() if engine == "sqlcipher" else None
            runs[engine].append(run_engine(key, work, cfg))
    return runs


# -- unlock ----------------------------------------------------------------------------


def _latency(samples: Sequence[float]) -> dict[str, Any]:
    """Median and p95 of timed runs, against the interactive-unlock target."""
    return {
        "runs": len(samples),
        "median_s": round(statistics.median(samples), 4),
        "p95_s": round(p95(samples), 4),
        "max_s": round(max(samples), 4),
        "within_target": p95(samples) <= UNLOCK_TARGET_S,
    }


def _fill_pod(pod: Pod, work: Workload, cfg: StoreBenchConfig) -> None:
    """Give a pod a chat history and memories, so that opening it is not trivial."""
    conversation = _new_conversation(pod.store, "history")
    rows = _message_rows(conversation, work.messages)
    while rows and len(rows) < cfg.pod_messages:
        rows += rows[: cfg.pod_messages - len(rows)]
    memories = list(work.memories)
    while memories and len(memories) < cfg.pod_memories:
        memories += memories[: cfg.pod_memories - len(memories)]
    _insert_batched(pod.store, _INSERT_MESSAGE, rows[: cfg.pod_messages], cfg.batch_size)
    _insert_batched(pod.store, _INSERT_MEMORY, memories[: cfg.pod_memories], cfg.batch_size)


def _time_create(root: Path, passphrase: str, runs: int) -> list[float]:
    """``Pod.create`` into fresh homes, with the default KDF parameters pinned."""
    samples = []
    for i in range(runs):
        started = time.perf_counter()
        pod = Pod.create(root / f"create-{i}", passphrase, name="bench", config=PodConfig())
        samples.append(time.perf_counter() - started)
        pod.close()
    return samples


def _time_open(home: Path, passphrase: str, runs: int) -> list[float]:
    """``Pod.open`` as the product calls it (config from the home and environment)."""
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        pod = Pod.open(home, passphrase)
        samples.append(time.perf_counter() - started)
        pod.close()
    return samples


def measure_unlock(work: Workload, cfg: StoreBenchConfig) -> dict[str, Any]:
    """Time key unwrapping, pod creation and pod unlock with the default Argon2id cost."""
    params = KdfParams()
    # A random throwaway passphrase: Argon2id's cost does not depend on its content.
    passphrase = secrets.token_urlsafe(18)
    _progress("unlock: unwrap")
    wrapped = wrap(new_data_key(), passphrase, params)
    unwrap_times = [_timed(lambda: unwrap(wrapped, passphrase)) for _ in range(cfg.unlock_runs)]
    with temporary_directory("covey-bench-") as tmp:
        root = Path(tmp)
        _progress("unlock: Pod.create")
        create_times = _time_create(root, passphrase, cfg.unlock_runs)
        home = root / "pod"
        with Pod.create(home, passphrase, name="bench", config=PodConfig()) as pod:
            _fill_pod(pod, work, cfg)
            counts = {"messages": pod.counts()["messages"], "memories": pod.memories.count()}
        _progress("unlock: Pod.open")
        open_times = _time_open(home, passphrase, cfg.unlock_runs)
    return {
        "target_s": UNLOCK_TARGET_S,
        "kdf": {"name": "argon2id", **asdict(params)},
        "unwrap": _latency(unwrap_times),
        "pod_create": _latency(create_times),
        "pod_open": {**_latency(open_times), "pod_rows": counts},
    }


# -- entry point -----------------------------------------------------------------------


def _progress(text: str) -> None:
    """Progress on stderr, so stdout stays the summary."""
    print(f"  [store] {text}", file=sys.stderr, flush=True)


def engine_versions() -> dict[str, str]:
    """The SQLCipher and SQLite versions of the engine both runs use."""
    conn = sqlite.connect(":memory:")
    try:
        cipher = conn.execute("PRAGMA cipher_version").fetchone()
        version = conn.execute("SELECT sqlite_version()").fetchone()[0]
    finally:
        conn.close()
    return {"sqlcipher": str(cipher[0]) if cipher else "none", "sqlite": str(version)}


def summary_lines(results: dict[str, Any]) -> list[str]:
    """One human-readable line per figure."""
    lines = []
    for phase, fig in results["phases"].items():
        cipher, plain = fig["sqlcipher"], fig["sqlite"]
        if fig["ops"] == 1:
            # A one-off step: its latency says more than a rate.
            figures = (f"sqlcipher {cipher['median_s'] * 1000:>9.2f} ms   "
                       f"    sqlite {plain['median_s'] * 1000:>9.2f} ms   ")
        else:
            figures = (f"sqlcipher {cipher['ops_per_s']:>11,.1f} ops/s"
                       f"   sqlite {plain['ops_per_s']:>11,.1f} ops/s")
        lines.append(f"{phase:<17} {figures}   ratio {fig['ratio']:.3f}"
                     f" (paired {fig['paired_ratio_median']:.3f})")
    overall = results["overall"]
    lines.append(
        f"{'overall':<17} sqlcipher {overall['sqlcipher']['median_s']:>9.3f} s"
        f"       sqlite {overall['sqlite']['median_s']:>9.3f} s       ratio {overall['ratio']:.3f}"
        f" (paired {overall['paired_ratio_median']:.3f})"
    )
    unlock = results["unlock"]
    for name in ("unwrap", "pod_create", "pod_open"):
        fig = unlock[name]
        verdict = "within" if fig["within_target"] else "OVER"
        lines.append(
            f"unlock {name:<10} median {fig['median_s']:.3f} s   p95 {fig['p95_s']:.3f} s"
            f"   ({verdict} the {unlock['target_s']} s target)"
        )
    return lines


def run(quick: bool = False, cfg: StoreBenchConfig | None = None) -> dict[str, Any]:
    """Run the store benchmark; returns ``config``, ``results`` and ``summary``."""
    cfg = cfg or (QUICK if quick else FULL)
    work = make_workload(cfg)
    runs = compare_engines(work, cfg)
    results = summarize_engines(runs, cfg)
    results["unlock"] = measure_unlock(work, cfg)
    config = {
        **asdict(cfg),
        "history_limit": HISTORY_LIMIT,
        "engine": engine_versions(),
        "tmp_dir": tempfile.gettempdir(),
        "pragmas": "journal_mode=WAL synchronous=FULL secure_delete=ON temp_store=MEMORY",
    }
    return {"config": config, "results": results, "summary": summary_lines(results)}

