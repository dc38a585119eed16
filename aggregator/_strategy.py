"""DP-FedAvg on the aggregator: sampling, checking and averaging pods' updates.

No Flower here: the ServerApp and the in-process simulation both call these functions.

Aggregation weights: when the run is private (noise multiplier > 0 and a finite clip
norm) every accepted update has the same weight and the sum is divided by the expected
number of pods q*N, so one user moves the average by at most C/(qN) whoever else took
part: the sensitivity the accountant assumes. A non-private run (no noise, no clipping)
is plain FedAvg: updates weighted by their number of examples over the realised total.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from covey.privacy import MAX_NORM, DPConfig, NoiseSource, mechanism

__all__ = ["PodUpdate", "RoundAggregate", "aggregate", "check_update"]

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
    """The largest norm an accepted update may have: the run's mechanism's bound
    (``local``: what an honest clipped-and-noised update reaches; ``central`` re-clips to
    C anyway; without DP only non-finite or absurd updates are refused)."""
    return mechanism(dp).max_norm(dp, size)


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
    """Check every update, then average the acceptable ones with the server step of the
    run's mechanism (:func:`covey.privacy.mechanism`).

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
    z = dp.noise_multiplier if noise_multiplier is None else noise_multiplier
    release = mechanism(dp).server_step(good, size, dp, expected_pods, noise, z)
    return RoundAggregate(release.mean, len(good), release.unclipped, rejected,
                          release.noise_std)
