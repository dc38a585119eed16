"""What ``covey simulate`` runs: one frozen configuration, checked before any work."""

from __future__ import annotations

import math
from dataclasses import dataclass

from covey.errors import InvalidInputError
from covey.models import resolve_precision
from covey.privacy import AdaptiveClipping
from covey.simulations._engines import ENGINES

__all__ = ["SimulationConfig"]


@dataclass(frozen=True)
class SimulationConfig:
    """What ``covey simulate`` runs."""

    pods: int = 0  # 0: every federated user with at least min_messages training messages
    min_messages: int = 2
    rounds: int = 10
    clients_per_round: int = 10
    target_epsilon: float = 8.0  # inf: no DP (plain FedAvg)
    mode: str = "central"
    clip_norm: float = 1.0
    delta: float = 0.0  # 0: a tenth of 1 / population
    accountant: str = "rdp"
    local_epochs: int = 1
    lr: float = 5e-3
    max_examples: int = 64
    eval_examples: int = 300
    #: None: the DP noise comes from the OS's CSPRNG and the run is private (the pods and
    #: evaluation messages are still chosen with seed 0). A number: everything derives
    #: from it, noise included, so the run is reproducible and reported as not private.
    seed: int | None = None
    engine: str = "fast"
    workers: int = 0  # processes training pods (0: one per CPU core)
    encrypted_pods: bool = False  # each pod keeps its data in a real encrypted store
    noise_multiplier: float | None = None  # set: this z (0: no DP) instead of the target's
    precision: str = "auto"  # of the pods' training; auto: bf16 where the CPU has it natively
    #: The Poisson sampling rate q of pods (0: clients_per_round / pods): the privacy
    #: audit's replica runs at the audited run's own q.
    sample_rate: float = 0.0
    adaptive: AdaptiveClipping | None = None  # quantile-based adaptive clipping (central)
    personalize: bool = True  # measure personal fine-tuning at the end (the audit skips it)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise InvalidInputError(f"engine must be one of {tuple(ENGINES)}, got "
                                    f"{self.engine!r}")
        if self.rounds < 1 or self.clients_per_round < 1 or self.min_messages < 1:
            raise InvalidInputError("rounds, clients per round and min messages must be >= 1")
        if self.workers < 0:
            raise InvalidInputError("workers must be >= 0 (0: one per CPU core)")
        if self.pods < 0:
            raise InvalidInputError("pods must be >= 0 (0: every eligible user)")
        if not self.target_epsilon > 0:
            raise InvalidInputError("target epsilon must be positive (inf: no DP)")
        if self.mode not in ("central", "local"):
            raise InvalidInputError("mode must be central or local")
        if self.encrypted_pods and self.engine != "fast":
            raise InvalidInputError("--encrypted-pods runs on the fast engine")
        try:
            resolve_precision(self.precision)
        except ValueError as exc:
            raise InvalidInputError(str(exc)) from None
        if self.seed is not None and self.seed < 0:
            raise InvalidInputError("seed must be >= 0")
        if not 0.0 <= self.sample_rate <= 1.0:
            raise InvalidInputError("sample rate must be in (0, 1] (0: clients per round / "
                                    "pods)")
        if self.adaptive is not None and self.mode != "central":
            raise InvalidInputError("adaptive clipping needs central mode")
        if self.encrypted_pods and math.isinf(self.target_epsilon):
            raise InvalidInputError("--encrypted-pods needs a private run: real pods refuse "
                                    "rounds without DP")

    @property
    def in_memory_pods(self) -> bool:
        """Whether the pods live in memory (the fast engine's worker pool trains them)."""
        return self.engine == "fast" and not self.encrypted_pods

    @property
    def choice_seed(self) -> int:
        """What picks the pods, the evaluation messages and the training order."""
        return 0 if self.seed is None else self.seed
