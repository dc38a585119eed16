"""Broken mechanisms for the audit's tests: noise sources that lie about what they add.

They plug into the seam a run's noise comes through (``simulate(..., noise=...)``,
``audit_run(..., noise=...)``), so the audit meets them exactly where a broken build's
noise would be. Module-level classes, so that the simulation's worker processes can
unpickle them.
"""

from __future__ import annotations

import numpy as np

from covey.privacy import SecureNoise


class ScaledNoise:
    """Claims to be the OS's CSPRNG at the requested std; draws ``scale`` times it."""

    private = True

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def normal(self, std: float, size: int) -> np.ndarray:
        return SecureNoise().normal(std * self.scale, size)

    def describe(self) -> str:
        return SecureNoise().describe()  # the lie a broken build would tell


class SilentNoise:
    """Claims the noise the configuration asks for; adds none."""

    private = True

    def normal(self, std: float, size: int) -> np.ndarray:
        return np.zeros(size)

    def describe(self) -> str:
        return SecureNoise().describe()
