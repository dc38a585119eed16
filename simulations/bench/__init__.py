"""covey's benchmarks, run by ``make bench`` (``python -m covey.simulations.bench``).

Each benchmark is a callable taking ``quick`` (a few-second smoke run instead of the full
measurement) and returning a JSON-ready dict with ``config``, ``results`` and
``summary`` (one human-readable line per figure). Every speed figure is a ratio against a
baseline measured in the same run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["BENCHMARKS", "Benchmark"]

Benchmark = Callable[[bool], dict[str, Any]]


def _store(quick: bool) -> dict[str, Any]:
    """SQLCipher against plain SQLite on the pod workload, and unlock time."""
    # Imported on use, so `--only other` never pays for (or breaks on) this one's imports.
    from covey.simulations.bench._store import run

    return run(quick)


def _embedder(quick: bool) -> dict[str, Any]:
    """The ONNX embedder against sentence-transformers: throughput and peak memory."""
    from covey.models import bench_embedder

    return bench_embedder(quick)


def _models(quick: bool) -> dict[str, Any]:
    """The language model: ONNX int8 against torch eager fp32 (TTFT, decode, memory)."""
    from covey.models import bench_language_model

    return bench_language_model(quick)


def _recall(quick: bool) -> dict[str, Any]:
    """Memory retrieval latency at 1k / 10k / 100k memories, and insert throughput."""
    from covey.simulations.bench._recall import run

    return run(quick)


def _turn(quick: bool) -> dict[str, Any]:
    """A chat turn by stage, against bare generation."""
    from covey.simulations.bench._turn import run

    return run(quick)


def _federated(quick: bool) -> dict[str, Any]:
    """Federated rounds on the loopback by number of pods; update size; the cost of DP."""
    from covey.simulations.bench._federated import run

    return run(quick)


def _engines(quick: bool) -> dict[str, Any]:
    """Simulation throughput: the fast engine against Flower's Simulation Runtime."""
    from covey.simulations.bench._engines import run

    return run(quick)


def _audit(quick: bool) -> dict[str, Any]:
    """Audit reports: a pod report, and a run report's empirical tests."""
    from covey.simulations.bench._audit import run

    return run(quick)


def _sync(quick: bool) -> dict[str, Any]:
    """Sync on the loopback: discovery, pairing, convergence by number of pods, bytes."""
    from covey.simulations.bench._sync import run

    return run(quick)


def _context(quick: bool) -> dict[str, Any]:
    """Context capture throughput from mosquitto; the safety filter's latency and rates."""
    from covey.simulations.bench._context import run

    return run(quick)


BENCHMARKS: dict[str, Benchmark] = {
    "store": _store,
    "models": _models,
    "embedder": _embedder,
    "recall": _recall,
    "turn": _turn,
    "federated": _federated,
    "engines": _engines,
    "audit": _audit,
    "sync": _sync,
    "context": _context,
}
