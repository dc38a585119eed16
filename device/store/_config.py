"""The pod's configuration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from covey import config
from covey.device.store._keys import KdfParams

__all__ = ["PodConfig", "load_pod_config"]


@dataclass(frozen=True)
class PodConfig:
    """Settings of one pod, from ``<home>/config.toml`` ``[pod]`` and ``COVEY_*`` variables.

    The KDF settings apply when a key is (re)wrapped; unlocking always uses the
    parameters recorded in the pod's key file.
    """

    kdf_time_cost: int = KdfParams.time_cost
    kdf_memory_kib: int = KdfParams.memory_kib
    kdf_parallelism: int = KdfParams.parallelism
    busy_timeout_ms: int = 10_000
    min_passphrase_chars: int = 8

    def __post_init__(self) -> None:
        _ = self.kdf  # constructing it validates the KDF triple
        if not 0 <= self.busy_timeout_ms <= 600_000:
            raise ValueError(f"busy_timeout_ms must be in 0..600000, got {self.busy_timeout_ms}")
        if self.min_passphrase_chars < 1:
            raise ValueError("min_passphrase_chars must be at least 1")

    @property
    def kdf(self) -> KdfParams:
        """The Argon2id parameters for new wrappings."""
        return KdfParams(self.kdf_time_cost, self.kdf_memory_kib, self.kdf_parallelism)


def load_pod_config(home: Path) -> PodConfig:
    """Load the pod's configuration (defaults, then TOML, then environment)."""
    return config.load(PodConfig, home / "config.toml", table="pod")
