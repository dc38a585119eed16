"""DP mechanisms by name: what a pod does to its update, and what the aggregator does
with the updates it accepted.

Each mechanism has a client step (:meth:`Mechanism.client_step`, run on the pod before
anything leaves it) and a server step (:meth:`Mechanism.server_step`, run on the
aggregator over the accepted updates). The client update and the strategy look the
mechanism up by the run's settings (:func:`mechanism`) and call it; neither branches on
the mode, so a new mechanism (``distributed``: noise shares and secure aggregation) is
one more entry in :data:`MECHANISMS`.

- ``none``: the run gives no guarantee (no noise or no clipping): pods clip to C (which
  may be infinite), the aggregator averages weighted by examples (FedAvg).
- ``central``: pods clip to C; the aggregator re-clips, sums, adds N(0, (zC)^2) and
  divides by the expected number of pods q*N.
- ``local``: pods clip to C and add N(0, (zC)^2) themselves (accounted at the
  replace-one sensitivity 2C, see :attr:`DPConfig.sensitivity`); the aggregator rejects
  a norm no honest pod reaches and divides the sum by q*N without more noise.

:func:`gaussian_release` is the same Gaussian mechanism for a statistic (the pods'
usage histogram).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np

from covey.privacy._dp import DPConfig, add_gaussian_noise, clip_update, local_norm_bound
from covey.privacy._noise import NoiseSource, SecureNoise

__all__ = ["MAX_NORM", "MECHANISMS", "USAGE_SENSITIVITY", "Contribution", "Mechanism",
           "ServerRelease", "gaussian_release", "mechanism"]

#: Norm past which any update is rejected when nothing tighter applies.
MAX_NORM = 1e6

#: L2 sensitivity of a user's hour-of-day usage histogram (fractions summing to 1):
#: replacing one user's data moves at most mass 1 from one bin to another, sqrt(2) apart.
USAGE_SENSITIVITY = math.sqrt(2.0)


def gaussian_release(values: np.ndarray, sensitivity: float, z: float,
                     noise: NoiseSource | None = None) -> np.ndarray:
    """``values`` (float64) plus N(0, (z * sensitivity)^2) per coordinate: the Gaussian
    mechanism for a statistic whose L2 sensitivity is ``sensitivity``.

    ``noise`` defaults to :class:`SecureNoise`.
    """
    draws = (noise or SecureNoise()).normal(z * sensitivity, values.size)
    return np.asarray(values, np.float64) + draws.reshape(values.shape)


class Contribution(Protocol):
    """One accepted update as a server step reads it."""

    @property
    def values(self) -> np.ndarray: ...

    @property
    def examples(self) -> int: ...

    @property
    def clipped(self) -> bool: ...


@dataclass(frozen=True)
class ServerRelease:
    """What a server step publishes: the average, and what it tells about the round."""

    mean: np.ndarray  # float32
    unclipped: int  # updates already within C (counted for adaptive clipping)
    noise_std: float  # standard deviation of the noise on the average


class Mechanism(ABC):
    """A DP mode: the pod's step and the aggregator's step of one round."""

    name: ClassVar[str]
    #: Whether a pod tells its number of examples (FedAvg's weight); in a private round
    #: the weights are uniform and the count (raw user data) stays on the pod.
    reports_examples: ClassVar[bool] = False
    #: Whether a pod reports its one clipping bit (an aggregator that sees the clipped
    #: update anyway counts the bits under DP for adaptive clipping).
    reports_clipped: ClassVar[bool] = False
    #: Whether a pod charges the whole run (z, q, T) at its user's first participation:
    #: sampling by the aggregator amplifies privacy only as a guarantee over the draw.
    #: Otherwise each participation is one unamplified release.
    charges_run: ClassVar[bool] = False
    #: Whether a pod with no examples answers with the noise alone (a refusal would tell
    #: the aggregator that the user has no data).
    answers_empty: ClassVar[bool] = False

    def client_step(self, delta: np.ndarray, dp: DPConfig, noise: NoiseSource | None = None
                    ) -> tuple[np.ndarray, float]:
        """What leaves the pod for a trained ``delta``, and its norm before clipping."""
        return clip_update(delta, dp.clip_norm)

    def max_norm(self, dp: DPConfig, size: int) -> float:
        """The largest norm an accepted update of ``size`` coordinates may have."""
        return MAX_NORM

    @abstractmethod
    def server_step(self, updates: Sequence[Contribution], size: int, dp: DPConfig,
                    expected_pods: float, noise: NoiseSource | None, z: float
                    ) -> ServerRelease:
        """The released average of the accepted ``updates`` (``z``: the update's noise
        multiplier, which adaptive clipping may have lowered)."""


class NoPrivacy(Mechanism):
    """FedAvg: clipping to C (possibly infinite), no noise, weights by examples."""

    name = "none"
    reports_examples = True

    def server_step(self, updates: Sequence[Contribution], size: int, dp: DPConfig,
                    expected_pods: float, noise: NoiseSource | None, z: float
                    ) -> ServerRelease:
        if not updates:
            return ServerRelease(np.zeros(size, np.float32), 0, 0.0)
        examples = sum(u.examples for u in updates)
        mean = np.zeros(size)
        for u in updates:
            mean += u.values.astype(np.float64) * (u.examples / examples)
        return ServerRelease(mean.astype(np.float32), len(updates), 0.0)


def _check_expected(expected_pods: float) -> None:
    if expected_pods <= 0:
        raise ValueError("expected number of pods must be positive")


class CentralDP(Mechanism):
    """Pods clip; the aggregator re-clips (pods are not trusted to have clipped), sums,
    adds N(0, (zC)^2) and divides by the expected number of pods."""

    name = "central"
    reports_clipped = True
    charges_run = True

    def server_step(self, updates: Sequence[Contribution], size: int, dp: DPConfig,
                    expected_pods: float, noise: NoiseSource | None, z: float
                    ) -> ServerRelease:
        _check_expected(expected_pods)
        total: np.ndarray = np.zeros(size, np.float64)
        unclipped = 0
        for u in updates:
            clipped, norm = clip_update(u.values, dp.clip_norm)
            unclipped += norm <= dp.clip_norm and not u.clipped
            total += clipped
        noised = add_gaussian_noise(total.astype(np.float32), z * dp.clip_norm, noise)
        return ServerRelease((noised / expected_pods).astype(np.float32), unclipped,
                             z * dp.clip_norm / expected_pods)


class LocalDP(Mechanism):
    """Pods clip and add N(0, (zC)^2); the aggregator bounds norms and averages."""

    name = "local"
    answers_empty = True

    def client_step(self, delta: np.ndarray, dp: DPConfig, noise: NoiseSource | None = None
                    ) -> tuple[np.ndarray, float]:
        clipped, norm = clip_update(delta, dp.clip_norm)
        return add_gaussian_noise(clipped, dp.noise_multiplier * dp.clip_norm, noise), norm

    def max_norm(self, dp: DPConfig, size: int) -> float:
        """What an honest clipped-and-noised update reaches except with probability
        1e-12 (:func:`local_norm_bound`), so one rogue pod moves the average no further
        than an honest one could (re-clipping would bias a noised update)."""
        return local_norm_bound(dp.clip_norm, dp.noise_multiplier * dp.clip_norm, size)

    def server_step(self, updates: Sequence[Contribution], size: int, dp: DPConfig,
                    expected_pods: float, noise: NoiseSource | None, z: float
                    ) -> ServerRelease:
        _check_expected(expected_pods)
        total: np.ndarray = np.zeros(size, np.float64)
        for u in updates:
            total += u.values
        noise_std = (z * dp.clip_norm * math.sqrt(len(updates)) / expected_pods
                     if updates else 0.0)
        return ServerRelease((total.astype(np.float32) / expected_pods).astype(np.float32),
                             0, noise_std)


#: The mechanisms by name.
MECHANISMS: dict[str, Mechanism] = {m.name: m for m in (NoPrivacy(), CentralDP(), LocalDP())}


def mechanism(dp: DPConfig) -> Mechanism:
    """The mechanism a run with ``dp`` uses: its mode's, or ``none`` when it is not
    private (no noise or no clipping)."""
    return MECHANISMS[dp.mode if dp.private else "none"]
