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

Noise comes from NumPy's PCG64 seeded from the operating system's entropy; it is
floating-point Gaussian noise (the known floating-point attacks on Laplace sampling are
not defended against here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["AdaptiveClipping", "DPConfig", "Mode", "add_gaussian_noise", "clip_update"]

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
                       rng: np.random.Generator | None = None) -> np.ndarray:
    """``values`` plus independent N(0, std^2) noise per coordinate (``std`` 0: unchanged)."""
    if std < 0 or not math.isfinite(std):
        raise ValueError(f"noise standard deviation must be finite and >= 0, got {std}")
    if std == 0:
        return values.astype(np.float32, copy=True)
    rng = rng or np.random.default_rng()
    return (values + rng.normal(0.0, std, size=values.shape)).astype(np.float32)


@dataclass(frozen=True)
class AdaptiveClipping:
    """Quantile-based adaptive clipping (Andrew et al. 2021, "Differentially Private
    Learning with Adaptive Clipping").

    Each round every pod also reports one bit, whether its update norm was at most C.
    The aggregator adds N(0, count_noise^2) to the sum of bits, divides by the expected
    number of pods and moves C geometrically toward the ``target_quantile`` of norms:
    C <- C * exp(-learning_rate * (b - target_quantile)).

    Its privacy cost is accounted by splitting one noise multiplier z between the two
    releases (Theorem 1 of the paper): the bits get ``count_noise`` (sensitivity 1/2 of
    a centered bit) and the update gets z_update = (z^-2 - (2 * count_noise)^-2)^-1/2,
    so the pair is exactly as private as one Gaussian release with multiplier z.
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

    def count_std(self, expected_pods: float) -> float:
        """Standard deviation of the noise on the count of unclipped updates."""
        return self.count_noise or max(expected_pods / 20.0, 1e-6)

    def update_noise_multiplier(self, z: float, expected_pods: float) -> float:
        """The multiplier left for the update once the count took its share of ``z``."""
        sigma_b = self.count_std(expected_pods)
        rest = z ** -2 - (2 * sigma_b) ** -2
        if rest <= 0:
            raise ValueError(
                f"noise multiplier {z:g} is too small for adaptive clipping with count "
                f"noise {sigma_b:g}: it needs z < 2 * count noise")
        return rest ** -0.5

    def next_clip(self, clip_norm: float, unclipped: int, expected_pods: float,
                  rng: np.random.Generator | None = None) -> float:
        """The clip norm of the next round from this round's count of unclipped updates."""
        rng = rng or np.random.default_rng()
        noisy = (unclipped + rng.normal(0.0, self.count_std(expected_pods))) / expected_pods
        return float(clip_norm * math.exp(-self.learning_rate * (noisy - self.target_quantile)))


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

    def statement(self) -> dict[str, object]:
        """The mechanism and its assumptions, as written into run records and reports."""
        noise_by = "aggregator" if self.mode == "central" else "each pod"
        if not self.private:
            return {"mode": "none", "mechanism": "FedAvg without differential privacy: "
                    "updates weighted by examples, no noise or no clipping",
                    "guarantee": "none", "sampling": f"Poisson sampling of pods, rate q="
                    f"{self.sample_rate:g}", "assumptions": []}
        return {
            "mode": self.mode,
            "mechanism": "DP-FedAvg: Gaussian mechanism on L2-clipped per-user LoRA updates",
            "adjacency": "user-level add/remove (all of one user's examples)",
            "clipping": ("adaptive, quantile-based (Andrew et al. 2021), initial "
                         f"C={self.clip_norm:g}" if self.adaptive else
                         f"fixed L2 norm C={self.clip_norm:g}"),
            "noise": f"N(0, (z*C)^2) per coordinate added by {noise_by}, "
                     f"z={self.noise_multiplier:g}",
            "aggregation": "uniform weights; the sum is divided by the expected number "
                           "of pods q*N, never by the realised count",
            "sampling": (f"Poisson sampling of pods by the aggregator, rate q="
                         f"{self.sample_rate:g}, with amplification" if self.mode == "central"
                         and self.sample_rate < 1 else
                         "no sampling amplification claimed (q=1)"),
            "accountant": self.accountant,
            "delta": self.delta,
            "assumptions": ["each user has one pod in the run and sends at most one "
                            "update per round", *(
                                ["the aggregator samples pods independently of their data",
                                 "the aggregator adds the stated noise (central mode "
                                 "trusts the aggregator)"] if self.mode == "central" else
                                ["the noise is drawn on the pod; nothing is trusted on "
                                 "the server"])],
        }
