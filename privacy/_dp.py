"""Differential-privacy mechanisms of a federated round: clipping, Gaussian noise, and
quantile-based adaptive clipping, with the statement of what each guarantees.

The mechanism (DP-FedAvg with a fixed denominator, McMahan et al. 2018):

- every pod sends its LoRA update clipped to L2 norm C (user-level: one update per user
  per round, whatever the number of examples);
- ``central`` mode: the aggregator sums the clipped updates, adds N(0, (zC)^2) per
  coordinate and divides by the *expected* number of pods q*N. The weights are uniform
  and the denominator does not depend on who took part, so one user changes the
  average by at most C / (qN) and the noise is z times that.
- ``local`` mode: each pod adds N(0, (zC)^2) to its own clipped update before it leaves;
  the pod's own releases are then accounted with no sampling amplification.

Noise comes from a :class:`~covey.privacy._noise.NoiseSource`: the operating system's
CSPRNG, drawn fresh for every release, unless a simulation asks for reproducible noise
from an explicit seed (and is then reported as not private). It is floating-point
Gaussian noise: floating-point attacks on Gaussian (and Laplace) samplers are not
defended against here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from covey.privacy._accounting import GaussianRounds, noise_for_epsilon
from covey.privacy._noise import NoiseSource, SecureNoise

__all__ = ["AdaptiveClipping", "DPConfig", "Mode", "add_gaussian_noise", "clip_update",
           "local_norm_bound"]

Mode = Literal["central", "local"]
MODES: tuple[Mode, ...] = ("central", "local")


def clip_update(update: np.ndarray, clip_norm: float) -> tuple[np.ndarray, float]:
    """Scale ``update`` to L2 norm at most ``clip_norm``; returns (clipped, original norm).

    ``clip_norm`` of ``inf`` leaves the update unchanged (no clipping, no guarantee).
    """
    norm = float(np.linalg.norm(update))
    if not math.isfinite(norm):
        raise ValueError("update has a non-finite norm")
    if norm <= clip_norm or norm == 0.0:
        return update.astype(np.float32, copy=True), norm
    return (update * (clip_norm / norm)).astype(np.float32), norm


def add_gaussian_noise(values: np.ndarray, std: float,
                       noise: NoiseSource | None = None) -> np.ndarray:
    """``values`` plus independent N(0, std^2) noise per coordinate (``std`` 0: unchanged).

    ``noise`` defaults to :class:`SecureNoise` (the OS's CSPRNG, nothing stored).
    """
    if std < 0 or not math.isfinite(std):
        raise ValueError(f"noise standard deviation must be finite and >= 0, got {std}")
    if std == 0:
        return values.astype(np.float32, copy=True)
    draws = (noise or SecureNoise()).normal(std, values.size).reshape(values.shape)
    return (values + draws).astype(np.float32)


#: An honest local update exceeds :func:`local_norm_bound` with at most this probability.
LOCAL_NORM_TAIL = 1e-12


def local_norm_bound(clip_norm: float, noise_std: float, size: int,
                     tail: float = LOCAL_NORM_TAIL) -> float:
    """The largest L2 norm an honest clipped-and-noised update of ``size`` coordinates
    reaches, except with probability ``tail``.

    The update is u + X with ||u|| <= C and X ~ N(0, s^2 I_d). The norm is s-Lipschitz in
    a standard normal vector and E||X|| <= s sqrt(d), so by Gaussian concentration
    (Boucheron, Lugosi, Massart 2013, Theorem 5.6) P(||X|| >= s (sqrt(d) + t)) <=
    exp(-t^2 / 2); t = sqrt(2 ln(1 / tail)).
    """
    if not 0 < tail < 1:
        raise ValueError("tail probability must be in (0, 1)")
    return clip_norm + noise_std * (math.sqrt(size) + math.sqrt(2 * math.log(1 / tail)))


@dataclass(frozen=True)
class AdaptiveClipping:
    """Quantile-based adaptive clipping (Andrew et al. 2021, "Differentially Private
    Learning with Adaptive Clipping").

    Each round every accepted update gives one bit b_i, whether its norm was at most C.
    The aggregator releases the *centred* sum S = sum_i (b_i - 1/2) + N(0, count_noise^2)
    (adding or removing one user moves the sum by exactly 1/2), estimates the fraction
    b = S / (expected pods) + 1/2 and moves C geometrically toward the
    ``target_quantile`` of norms: C <- C * exp(-learning_rate * (b - target_quantile)).
    This is the paper's Algorithm 1 as TF-Privacy implements it
    (``QuantileEstimatorQuery``: records shifted to [-1/2, 1/2], the 1/2 added back
    after normalising).

    Its privacy cost is accounted by splitting one noise multiplier z between the two
    releases (Theorem 1 of the paper): the centred count has sensitivity 1/2, so its
    multiplier is 2 * count_noise, and the update gets
    z_update = (z^-2 - (2 * count_noise)^-2)^-1/2: the pair is exactly as private as one
    Gaussian release with multiplier z.
    """

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise: float = 0.0  # 0 means: expected pods / 20, the paper's default

    def __post_init__(self) -> None:
        if not 0.0 < self.target_quantile < 1.0:
            raise ValueError("target quantile must be in (0, 1)")
        if self.learning_rate <= 0:
            raise ValueError("adaptive clipping learning rate must be positive")
        if self.count_noise < 0:
            raise ValueError("count noise must be >= 0")

    #: L2 sensitivity of the centred count under add/remove of one user.
    COUNT_SENSITIVITY = 0.5

    def count_std(self, expected_pods: float) -> float:
        """Standard deviation of the noise on the count of unclipped updates."""
        return self.count_noise or max(expected_pods / 20.0, 1e-6)

    def update_noise_multiplier(self, z: float, expected_pods: float) -> float:
        """The multiplier left for the update once the count took its share of ``z``."""
        count_z = self.count_std(expected_pods) / self.COUNT_SENSITIVITY
        rest = z ** -2 - count_z ** -2
        if rest <= 0:
            raise ValueError(
                f"noise multiplier {z:g} is too small for adaptive clipping with count "
                f"noise {self.count_std(expected_pods):g}: it needs z < 2 * count noise")
        return rest ** -0.5

    def next_clip(self, clip_norm: float, unclipped: int, participants: int,
                  expected_pods: float, noise: NoiseSource | None = None) -> float:
        """The clip norm of the next round from this round's ``unclipped`` updates among
        ``participants`` accepted ones (the centred count, noised)."""
        if not 0 <= unclipped <= participants:
            raise ValueError("unclipped updates must be between 0 and the participants")
        centred = unclipped - 0.5 * participants  # sum of (b_i - 1/2)
        draw = float((noise or SecureNoise()).normal(self.count_std(expected_pods), 1)[0])
        estimate = (centred + draw) / expected_pods + 0.5
        return float(clip_norm * math.exp(-self.learning_rate *
                                          (estimate - self.target_quantile)))


@dataclass(frozen=True)
class DPConfig:
    """The DP settings of a federated run: mode, noise multiplier z, clip norm C, sampling."""

    mode: Mode = "central"
    noise_multiplier: float = 1.0
    clip_norm: float = 1.0
    sample_rate: float = 1.0
    delta: float = 1e-5
    accountant: str = "rdp"
    adaptive: AdaptiveClipping | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"DP mode must be one of {MODES}, got {self.mode!r}")
        if self.noise_multiplier < 0 or not math.isfinite(self.noise_multiplier):
            raise ValueError("noise multiplier must be finite and >= 0")
        if not self.clip_norm > 0:
            raise ValueError("clip norm must be positive")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError("sample rate must be in (0, 1]")
        if not 0.0 < self.delta < 1.0:
            raise ValueError("delta must be in (0, 1)")
        if self.adaptive is not None and self.mode != "central":
            raise ValueError("adaptive clipping needs central mode (the aggregator counts)")

    @property
    def private(self) -> bool:
        """Whether this configuration gives a DP guarantee at all."""
        return self.noise_multiplier > 0 and math.isfinite(self.clip_norm)

    @property
    def amplified_rate(self) -> float:
        """The sampling rate the accountant may use: q in central mode; 1 in local mode,
        where a pod accounts its own releases and cannot verify the aggregator's sampling."""
        return self.sample_rate if self.mode == "central" else 1.0

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of one release, in units of C.

        ``central``: user-level add/remove of the whole user: one clipped update in or
        out of the sum, C. ``local``: the aggregator sees each pod's release, so the
        neighbouring inputs are any two data sets of one user (replace-one; a pod with
        no examples sends a noised zero update rather than a refusal that would give its
        emptiness away): two clipped updates can be 2C apart.
        """
        return 1.0 if self.mode == "central" else 2.0

    @property
    def accounted_noise_multiplier(self) -> float:
        """The noise relative to the sensitivity: what the accountant composes."""
        return self.noise_multiplier / self.sensitivity

    def segment(self, rounds: int) -> GaussianRounds:
        """``rounds`` releases of this mechanism, as the accountant sees them."""
        return GaussianRounds(self.accounted_noise_multiplier, self.amplified_rate, rounds)

    def solved(self, target_epsilon: float, rounds: int) -> DPConfig:
        """This configuration with the smallest z whose ``rounds`` releases stay within
        ``target_epsilon`` (raises ValueError when none does)."""
        z = noise_for_epsilon(target_epsilon, self.delta, self.amplified_rate, rounds,
                              self.accountant)
        return replace(self, noise_multiplier=z * self.sensitivity)

    def _noise_statement(self, expected_pods: float | None) -> str:
        by = "the aggregator" if self.mode == "central" else "each pod"
        if self.adaptive is None or expected_pods is None:
            return (f"N(0, (z*C)^2) per coordinate added by {by}, z={self.noise_multiplier:g}"
                    f" (accounted as {self.accounted_noise_multiplier:g} times the "
                    "sensitivity)")
        z_update = self.adaptive.update_noise_multiplier(self.noise_multiplier, expected_pods)
        count_std = self.adaptive.count_std(expected_pods)
        return (f"N(0, (z_u*C)^2) per coordinate added by {by}, z_u={z_update:.6g}, and "
                f"N(0, {count_std:.6g}^2) on the centred count of unclipped updates "
                f"(sensitivity {AdaptiveClipping.COUNT_SENSITIVITY:g}); the pair is "
                f"accounted as one Gaussian release with z={self.noise_multiplier:g} "
                "(Andrew et al. 2021, Theorem 1)")

    def statement(self, expected_pods: float | None = None) -> dict[str, object]:
        """The mechanism and its assumptions, as written into run records and reports.

        With adaptive clipping and ``expected_pods`` (q*N) known, the noise line gives the
        split of z the run uses: the update's multiplier and the count's noise."""
        if not self.private:
            return {"mode": "none", "mechanism": "FedAvg without differential privacy: "
                    "updates weighted by examples, no noise or no clipping",
                    "guarantee": "none", "sampling": f"Poisson sampling of pods, rate q="
                    f"{self.sample_rate:g}", "assumptions": [],
                    "aggregator_sees": "every pod's update in the clear, unclipped"}
        central = self.mode == "central"
        split = ({"update_noise_multiplier": self.adaptive.update_noise_multiplier(
                      self.noise_multiplier, expected_pods),
                  "count_noise_std": self.adaptive.count_std(expected_pods)}
                 if self.adaptive and expected_pods is not None else {})
        return {
            **({"noise_split": split} if split else {}),
            "mode": self.mode,
            "mechanism": "DP-FedAvg: Gaussian mechanism on L2-clipped per-user LoRA updates",
            "adjacency": ("user-level add/remove (all of one user's data); sensitivity C"
                          if central else "user-level replace-one (any two data sets of "
                          "one user, an empty one included); sensitivity 2C"),
            "clipping": ("adaptive, quantile-based (Andrew et al. 2021), initial "
                         f"C={self.clip_norm:g}" if self.adaptive else
                         f"fixed L2 norm C={self.clip_norm:g}"),
            "noise": self._noise_statement(expected_pods),
            "aggregation": "uniform weights; the sum is divided by the expected number "
                           "of pods q*N, never by the realised count",
            "sampling": (f"Poisson sampling of pods by the aggregator, rate q="
                         f"{self.sample_rate:g}, with amplification" if central
                         and self.sample_rate < 1 else
                         "no sampling amplification claimed (q=1)"),
            "accountant": self.accountant,
            "delta": self.delta,
            "aggregator_sees": (
                "each sampled pod's clipped update in the clear (and one bit per pod, "
                "whether clipping scaled it, for adaptive clipping); only what it "
                "publishes (the noised average) is differentially private" if central else
                "each sampled pod's clipped and noised update; nothing else about the pod's "
                "data (no example counts, losses or epsilon)"),
            "assumptions": ["one update per user per round, whatever the number of the "
                            "user's pods", *(
                                ["the aggregator samples pods independently of their data",
                                 "the aggregator adds the stated noise and keeps the "
                                 "clipped updates to itself (central mode trusts the "
                                 "aggregator)"] if central else
                                ["the noise is drawn on the pod; nothing is trusted on "
                                 "the server"])],
        }
