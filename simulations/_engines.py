"""Simulation engines by name: each runs a simulation's rounds over its own transport.

An engine is handed the run's rounds (the aggregator's ``run_federated`` over a
:class:`~covey.aggregator.Transport`) and calls them with its transport: ``fast`` with
in-process pods, ``flower`` from inside the ServerApp of Flower's Simulation Runtime.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from covey._files import write_atomic

if TYPE_CHECKING:
    from covey.aggregator import Transport
    from covey.privacy import NoiseSource
    from covey.simulations._canaries import CanaryClients
    from covey.simulations._config import SimulationConfig
    from covey.simulations._in_process import StorePods
    from covey.simulations._pool import MemoryPods

__all__ = ["ENGINES", "Engine", "EngineRun", "Rounds"]

#: The run's rounds over a transport; returns the run record.
Rounds = Callable[["Transport"], dict[str, Any]]


@dataclass(frozen=True)
class EngineRun:
    """What an engine gets from the run it carries."""

    cfg: SimulationConfig
    users: Sequence[Any]
    model: Any
    tok: Any
    out: Path
    aggregator_key: bytes
    workers: int
    delta: float
    pods: MemoryPods | None = None  # the in-memory pods, started before the evaluator
    noise: NoiseSource | None = None
    canaries: CanaryClients | None = None


Engine = Callable[[EngineRun, Rounds], dict[str, Any]]


def fast(run: EngineRun, rounds: Rounds) -> dict[str, Any]:
    """Pods in this process (and its workers): real encrypted stores with
    ``--encrypted-pods``, else in memory, with the audit's canary clients among them when
    given."""
    from covey.simulations._pool import pod_noise

    if run.cfg.encrypted_pods:
        return rounds(_store_pods(run))
    if run.pods is None:
        raise RuntimeError("the fast engine runs with in-memory pods, none were started")
    if run.canaries is not None:
        cfg, noise = run.cfg, run.noise
        return rounds(run.canaries.around(
            run.pods, lambda rnd, node: pod_noise(cfg.seed, rnd, node, noise)))
    return rounds(run.pods)


def flower(run: EngineRun, rounds: Rounds) -> dict[str, Any]:
    """Flower's Simulation Runtime (Ray): one virtual SuperNode per pod."""
    from covey.simulations._flower import run_flower

    return run_flower(run.cfg, len(run.users), run.workers, rounds)


ENGINES: dict[str, Engine] = {"fast": fast, "flower": flower}


def _store_pods(run: EngineRun) -> StorePods:
    """One real encrypted pod per user under ``out/pods`` (kept for a resumed run), each
    holding all of its user's training messages, their consent to federated training and
    a budget policy of the run's target (epsilon, delta); the passphrase is random, in
    ``out/pods/passphrase`` (mode 0600)."""
    from covey.simulations._in_process import StorePods
    from covey.simulations._seeding import seed_pods

    root, secret = run.out / "pods", run.out / "pods" / "passphrase"
    if secret.exists():
        passphrase = secret.read_text().strip()
        homes = [root / f"pod{i}" for i in range(len(run.users))]
    else:
        root.mkdir(parents=True, exist_ok=True)
        passphrase = secrets.token_urlsafe(16)
        write_atomic(secret, passphrase.encode(), mode=0o600)
        homes = seed_pods(root, run.users, passphrase,
                          examples=max(len(u.train) for u in run.users),
                          budget=(run.cfg.target_epsilon, run.delta))
    return StorePods(homes, passphrase, run.model, run.tok, run.aggregator_key, run.workers)
