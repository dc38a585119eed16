"""Rank fusion for hybrid memory retrieval: reciprocal rank fusion and time decay.

Semantic and keyword scores live on different scales (cosine against BM25), so results
are fused by rank alone: reciprocal rank fusion (Cormack, Clarke and Büttcher, SIGIR 2009)
gives an item ``w / (k + rank)`` from each ranking it appears in. Time decay then lowers
old memories by their age's half-lives. All functions are pure; ties are broken by id so
the same inputs always give the same order.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

__all__ = ["fuse_with_decay", "reciprocal_rank_fusion", "time_decay"]

RRF_K = 60


def _check_k(k: float) -> None:
    """Raise ValueError unless ``k`` is a positive finite number."""
    if isinstance(k, bool) or not isinstance(k, numbers.Real) or not 0 < k < math.inf:
        raise ValueError(f"RRF k must be a positive number, got {k!r}")


def _check_weights(weights: Sequence[float] | None, count: int) -> Sequence[float]:
    """The weights to use: one finite non-negative number per ranking (all 1 when None)."""
    if weights is None:
        return [1.0] * count
    if len(weights) != count:
        raise ValueError(f"got {len(weights)} weights for {count} rankings")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not 0 <= w < math.inf:
            raise ValueError(f"RRF weights must be finite and >= 0, got {w!r}")
    return weights


def _sorted(scores: Mapping[int, float]) -> list[tuple[int, float]]:
    """Items by descending score, then ascending id."""
    return sorted(scores.items(), key=lambda item: (-item[1], item[0]))


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k: float = RRF_K,
                           weights: Sequence[float] | None = None) -> list[tuple[int, float]]:
    """Fuse rankings of ids into one: each id scores the sum of ``w / (k + rank)``.

    Ranks start at 1. An id repeated within one ranking counts at its best rank only.

    Args:
        rankings: lists of ids, best first.
        k: damping constant; larger values flatten the gap between top and lower ranks.
        weights: one weight per ranking; None weighs all equally.

    Returns:
        ``(id, score)`` pairs by descending score, ties by ascending id.

    Raises:
        ValueError: ``k`` <= 0, or weights of the wrong length or negative.
    """
    _check_k(k)
    ws = _check_weights(weights, len(rankings))
    scores: dict[int, float] = {}
    for ranking, w in zip(rankings, ws, strict=True):
        seen: set[int] = set()
        for rank, item in enumerate(ranking, start=1):
            if item in seen:
                continue
            seen.add(item)
            scores[item] = scores.get(item, 0.0) + w / (k + rank)
    return _sorted(scores)


def time_decay(age_seconds: float, half_life_seconds: float) -> float:
    """Exponential decay: 1 at age 0, 0.5 at one half-life; negative ages count as 0.

    A half-life of ``math.inf`` means no decay.

    Raises:
        ValueError: the half-life is not positive, or the age is NaN.
    """
    if not half_life_seconds > 0:
        raise ValueError(f"half-life must be > 0, got {half_life_seconds!r}")
    if math.isnan(age_seconds):
        raise ValueError("age must be a number, got NaN")
    # Clocks of paired devices disagree a little: a memory "from the future" is new.
    age = max(float(age_seconds), 0.0)
    if math.isinf(half_life_seconds):
        return 1.0
    return 0.5 ** (age / half_life_seconds)


def fuse_with_decay(rankings: Sequence[Sequence[int]], ages: Mapping[int, float],
                    half_life_seconds: float, k: float = RRF_K,
                    weights: Sequence[float] | None = None, floor: float = 0.0
                    ) -> list[tuple[int, float]]:
    """Reciprocal rank fusion, each score scaled by ``floor + (1 - floor) * decay(age)``.

    Args:
        rankings: lists of ids, best first.
        ages: age in seconds of every id in ``rankings``.
        half_life_seconds: age at which a memory's weight halves (``math.inf``: never).
        k: RRF damping constant.
        weights: one weight per ranking; None weighs all equally.
        floor: the least weight an old memory keeps, in [0, 1]; 1 turns decay off.

    Returns:
        ``(id, score)`` pairs by descending decayed score, ties by ascending id.

    Raises:
        ValueError: a bad ``k``, weights, half-life or floor, or an id without an age.
    """
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"decay floor must be in [0, 1], got {floor!r}")
    if not half_life_seconds > 0:
        raise ValueError(f"half-life must be > 0, got {half_life_seconds!r}")
    fused = reciprocal_rank_fusion(rankings, k=k, weights=weights)
    scores: dict[int, float] = {}
    for item, score in fused:
        age = ages.get(item)
        if age is None:
            # An id, never text: safe in a message.
            raise ValueError(f"no age given for id {item}")
        scores[item] = score * (floor + (1.0 - floor) * time_decay(age, half_life_seconds))
    return _sorted(scores)
