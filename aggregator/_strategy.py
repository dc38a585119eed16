"""DP-FedAvg on the aggregator: sampling, checking and averaging pods' updates.

No Flower here: the ServerApp and the in-process simulation both call these functions.

Aggregation weights: when the run is private (noise multiplier > 0 and a finite clip
norm) every accepted update has the same weight and the sum is divided by the expected
number of pods q*N, so one user moves the average by at most C/(qN) whoever else took
part: the sensitivity the accountant assumes. A non-private run (no noise, no clipping)
is plain FedAvg: updates weighted by their number of examples over the realised total.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from covey.privacy import (
    DPConfig,
    NoiseSource,
    add_gaussian_noise,
    clip_update,
    local_norm_bound,
)

__all__ = ["PodUpdate", "RoundAggregate", "aggregate", "check_update"]

#: Norm past which any update is rejected when nothing tighter applies (no DP).
MAX_NORM = 1e6

#: Reasons an update is rejected, as counted in metrics and run records.
REJECTIONS = ("non_finite", "wrong_shape", "wrong_version", "malformed", "too_large",
              "duplicate_user")


@dataclass(frozen=True)
class PodUpdate:
    """One pod's reply to a training round, as the aggregator received it."""

    node_id: int
    values: np.ndarray
    examples: int  # 0 in private rounds: pods do not tell how many examples they hold
    version: str
    clipped: bool = False  # central mode: the pod's own clipping scaled it down
    user_token: str = ""  # one per user and round (empty: the pod did not say)


@dataclass
class RoundAggregate:
    """What a round produced: the averaged delta and what was accepted or rejected."""

    delta: np.ndarray
    accepted: int
    unclipped: int  # accepted updates whose norm was already within C (adaptive clipping)
    rejected: Counter[str] = field(default_factory=Counter)
    noise_std: float = 0.0  # standard deviation of the noise on the average


def max_norm(dp: DPConfig, size: int) -> float:
    """The largest norm an accepted update may have.

    ``local`` mode: what an honest clipped-and-noised update reaches except with
    probability 1e-12 (:func:`~covey.privacy.local_norm_bound`), so one rogue pod moves
    the average no further than an honest one could. ``central`` mode re-clips to C
    anyway; without DP only non-finite or absurd updates are refused.
    """
    if dp.private and dp.mode == "local":
        return local_norm_bound(dp.clip_norm, dp.noise_multiplier * dp.clip_norm, size)
    return MAX_NORM


def check_update(update: PodUpdate, size: int, version: str, max_norm: float = MAX_NORM,
                 private: bool = False) -> str | None:
    """Why ``update`` must be rejected, or None when it is acceptable.

    Example counts weight non-private FedAvg only; private rounds carry none.
    """
    if update.version != version:
        return "wrong_version"
    values = update.values
    if values.dtype != np.float32 or values.ndim != 1 or values.size != size:
        return "wrong_shape"
    if not np.all(np.isfinite(values)):
        return "non_finite"
    if update.examples < (0 if private else 1):
        return "malformed"
    if float(np.linalg.norm(values)) > max_norm:
        return "too_large"
    return None


def aggregate(updates: Sequence[PodUpdate], size: int, version: str, dp: DPConfig,
              expected_pods: float, noise: NoiseSource | None = None,
              noise_multiplier: float | None = None) -> RoundAggregate:
    """Check every update, then average the acceptable ones as the run's DP mode requires.

    ``central`` mode: re-clip each update to C on the aggregator (pods are not trusted
    to have clipped), sum, add N(0, (z C)^2) and divide by ``expected_pods``.
    ``local`` mode: the pods noised their updates; re-clipping would bias a noised
    update, so the sum is divided by ``expected_pods`` without more noise, and an update
    whose norm no honest pod reaches is rejected (``too_large``).
    ``noise_multiplier`` overrides ``dp.noise_multiplier`` for the update's noise (the
    share left by adaptive clipping).
    """
    rejected: Counter[str] = Counter()
    good: list[PodUpdate] = []
    bound = max_norm(dp, size)
    users: set[str] = set()
    for u in updates:
        reason = check_update(u, size, version, bound, dp.private)
        if reason is None and u.user_token:
            # one update per user per round: a user's second pod is turned away
            reason = "duplicate_user" if u.user_token in users else None
            users.add(u.user_token)
        if reason:
            rejected[reason] += 1
        else:
            good.append(u)
    if not dp.private:
        if not good:
            return RoundAggregate(np.zeros(size, np.float32), 0, 0, rejected)
        examples = sum(u.examples for u in good)
        mean = np.zeros(size)
        for u in good:
            mean += u.values.astype(np.float64) * (u.examples / examples)
        return RoundAggregate(mean.astype(np.float32), len(good), len(good), rejected)
    if expected_pods <= 0:
        raise ValueError("expected number of pods must be positive")
    z = dp.noise_multiplier if noise_multiplier is None else noise_multiplier
    total: np.ndarray = np.zeros(size, np.float64)
    unclipped = 0
    for u in good:
        if dp.mode == "central":
            clipped, norm = clip_update(u.values, dp.clip_norm)
            unclipped += norm <= dp.clip_norm and not u.clipped
            total += clipped
        else:
            total += u.values
    noise_std = 0.0
    if dp.mode == "central":
        noised = add_gaussian_noise(total.astype(np.float32), z * dp.clip_norm, noise)
        noise_std = z * dp.clip_norm / expected_pods
    else:
        noised = total.astype(np.float32)
        noise_std = (z * dp.clip_norm * math.sqrt(len(good)) / expected_pods) if good else 0.0
    return RoundAggregate((noised / expected_pods).astype(np.float32), len(good), unclipped,
                          rejected, noise_std)
