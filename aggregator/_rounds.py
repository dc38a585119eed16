"""A federated training run on the aggregator, independent of the transport.

:func:`run_federated` drives the rounds: sample pods, send each the signed current
version and the round's DP settings, collect replies until the round's timeout, check
and aggregate (``covey.aggregator._strategy``), evaluate on the public share's held-out
users, register and sign the new version (or roll back a version whose perplexity is
more than 10 % worse than the best), account epsilon, and write the run record.

The Flower ServerApp supplies a :class:`Transport` over real SuperNodes; the in-process
simulation engine supplies one that calls the pods' code directly. One code path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from covey._files import write_atomic
from covey._time import utc_timestamp
from covey.aggregator._registry import Registry
from covey.aggregator._strategy import PodUpdate, aggregate
from covey.errors import CoveyError, InvalidInputError
from covey.models import check_precision
from covey.privacy import (
    AdaptiveClipping,
    DPConfig,
    NoiseSource,
    SecureNoise,
    SeededNoise,
    SeedRatchet,
    epsilon_spent,
    poisson_sample,
)
from covey.protocols import RoundMessage

__all__ = ["PodReply", "RunConfig", "Transport", "run_federated"]

_log = logging.getLogger(__name__)

#: A version whose held-out perplexity exceeds the best one's by more than this is rolled back.
ROLLBACK_TOLERANCE = 0.10


class RunError(CoveyError):
    """A federated run could not go on (too few pods, no noise meets the target, ...)."""

    exit_code = 9


@dataclass(frozen=True)
class RunConfig:
    """Settings of one federated run (``covey train`` options)."""

    rounds: int = 3
    dp: DPConfig = field(default_factory=DPConfig)
    target_epsilon: float | None = None  # what the noise multiplier was solved for
    min_pods: int = 2
    round_timeout: float = 120.0
    wait_timeout: float = 60.0
    local_epochs: int = 1
    lr: float = 5e-3
    max_examples: int = 256
    eval_examples: int = 200
    seed: int = 0  # of the pods' local training (batch order), sent to them
    precision: str = "fp32"  # of the pods' local training: fp32 or bf16
    #: Set only by simulations a researcher wants to reproduce (``--seed``): sampling and
    #: noise then derive from it, and the run is reported as not private. None: the
    #: noise comes from the OS's CSPRNG and the sampling from a random seed ratchet.
    reproducible_seed: int | None = None

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError("rounds must be at least 1")
        check_precision(self.precision)
        if self.min_pods < 1:
            raise ValueError("min_pods must be at least 1")
        if self.round_timeout <= 0 or self.wait_timeout <= 0:
            raise ValueError("timeouts must be positive")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        d = asdict(self)
        d["dp"] = {**asdict(self.dp), "adaptive": asdict(self.dp.adaptive)
                   if self.dp.adaptive else None}
        return d


@dataclass(frozen=True)
class PodReply:
    """A pod's answer: an update, or a refusal with its code, or a transport error."""

    node_id: int
    values: np.ndarray | None = None
    version: str = ""
    examples: int = 0
    clipped: bool = False
    refusal: str = ""  # a RoundRefused code, or "error" for a crash or malformed reply
    message: str = ""
    user_token: str = ""  # the same for two pods of one user in one round


class Transport(Protocol):
    """How the aggregator reaches pods.

    A transport to pods that keep a privacy ledger also has ``announce(nodes, payload,
    timeout) -> list[PodReply]``: the run's first round payload, sent to every connected
    pod before the run starts (see :func:`run_federated`). Simulated pods keep no ledger
    and need none.
    """

    def node_ids(self) -> list[int]:
        """The pods connected now."""
        ...

    def train(self, nodes: Sequence[int], payload: RoundMessage, timeout: float
              ) -> list[PodReply]:
        """Send ``payload`` to ``nodes``; the replies that arrived within ``timeout``."""
        ...


Evaluator = Callable[[bytes], dict[str, float]]



def _wait_for_pods(transport: Transport, cfg: RunConfig) -> list[int]:
    deadline = time.monotonic() + cfg.wait_timeout
    while True:
        nodes = sorted(transport.node_ids())
        if len(nodes) >= cfg.min_pods:
            return nodes
        if time.monotonic() > deadline:
            raise RunError(f"only {len(nodes)} of the {cfg.min_pods} pods needed connected "
                           f"within {cfg.wait_timeout:g} s")
        time.sleep(0.5)


def run_epsilon(cfg: RunConfig, rounds: int, accountant: str | None = None) -> float:
    """Epsilon of ``rounds`` rounds of this run's mechanism (inf when not private).

    Central mode accounts the aggregator's Poisson sampling at rate q; local mode is the
    bound for one pod's own releases, one per round, without amplification.
    """
    dp = cfg.dp
    if not dp.private:
        return math.inf
    if rounds == 0:
        return 0.0
    return epsilon_spent([dp.segment(rounds)], dp.delta, accountant or dp.accountant)


def checkpoint_path(record_path: Path) -> Path:
    """Where a run keeps what ``--resume`` needs (mode 0600; removed when it completes).

    Never inside the run record, which is shared with auditors: the checkpoint holds the
    sampling ratchet's next state (which reveals no past round's sample, but would let
    its reader predict the rest of the run's).
    """
    return record_path.with_suffix(".checkpoint")


def _checkpoint(record_path: Path, cfg: RunConfig, run_id: str
                ) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The unfinished record and its checkpoint, or None when there is nothing to resume."""
    saved = checkpoint_path(record_path)
    if not record_path.exists() or not saved.exists():
        return None
    try:
        record: dict[str, Any] = json.loads(record_path.read_text())
        state: dict[str, Any] = json.loads(saved.read_text())
    except ValueError:
        raise RunError(f"{record_path} or its checkpoint is corrupt; cannot resume") from None
    if record.get("status") == "completed":
        return None
    if record.get("config") != json.loads(json.dumps(cfg.to_dict())) or \
            record.get("run_id") != run_id or state.get("run_id") != run_id:
        raise InvalidInputError(f"{record_path} is a different run (configuration differs); "
                       "resume it with the settings it started with")
    return record, state


def _randomness(cfg: RunConfig, noise: NoiseSource | None = None) -> dict[str, Any]:
    """What the run record says about where its sampling and noise came from."""
    if noise is not None:
        stated = _randomness(cfg)
        return {**stated, "noise": noise.describe(),
                "private": stated["private"] and noise.private}
    if cfg.reproducible_seed is None:
        return {"reproducible": False, "private": True, "noise": SecureNoise().describe(),
                "sampling": "keyed hashes of a forward-secure seed ratchet started from "
                            "os.urandom; only the next state is kept (for --resume, in a "
                            "0600 file removed when the run completes)"}
    return {"reproducible": True, "private": False, "seed": cfg.reproducible_seed,
            "noise": f"NumPy PCG64 derived from seed {cfg.reproducible_seed} and the round",
            "sampling": f"keyed hashes of a seed ratchet started from seed "
                        f"{cfg.reproducible_seed}",
            "warning": "the noise can be regenerated from the seed and subtracted: this run "
                       "is reproducible and gives no privacy guarantee"}


def round_noise(cfg: RunConfig, round_seed: bytes) -> NoiseSource:
    """The aggregator's noise for one round: fresh CSPRNG draws, or the seed's."""
    if cfg.reproducible_seed is None:
        return SecureNoise()
    return SeededNoise(int.from_bytes(hashlib.sha256(b"noise" + round_seed).digest()[:16],
                                      "big"))


def _payload(cfg: RunConfig, registry: Registry, run_id: str, rnd: int, clip: float,
             version: Any, signature: bytes, adapter_bytes: bytes) -> RoundMessage:
    """What every pod sampled in round ``rnd`` receives, its settings signed."""
    from dataclasses import replace

    dp = cfg.dp
    round_dp = DPConfig(dp.mode, dp.noise_multiplier, clip, dp.sample_rate, dp.delta,
                        dp.accountant, None)
    payload = RoundMessage(run_id, rnd, cfg.rounds, round_dp, json.loads(version.canonical()),
                           signature, adapter_bytes, cfg.local_epochs, cfg.lr,
                           cfg.max_examples, cfg.seed + rnd, cfg.precision,
                           dp.adaptive is not None)
    return replace(payload, round_signature=registry.sign_round(payload.settings()))


def run_federated(transport: Transport, registry: Registry, cfg: RunConfig, run_id: str,
                  evaluator: Evaluator, record_path: Path,
                  on_round: Callable[[dict[str, Any]], None] | None = None,
                  resume: bool = False, noise: NoiseSource | None = None) -> dict[str, Any]:
    """Run ``cfg.rounds`` rounds and return the run record (also written to ``record_path``).

    The record is rewritten after every round; a checkpoint beside it (the sampling
    ratchet's next state, the clip norm, the best and current versions; see
    :func:`checkpoint_path`) lets ``resume`` continue an unfinished run with the same
    configuration from its last completed round. A resumed reproducible run equals an
    uninterrupted one; a private run's noise is fresh either way.

    ``noise`` replaces the aggregator's noise source for every round (default:
    :func:`round_noise`); the privacy audit's replica takes it, so that a test can feed
    the audit a broken mechanism through the same code a run uses.

    Raises:
        RunError: too few pods connected in time, no current version to start from, or a
            checkpoint that does not belong to this configuration.
        InvalidInputError: delta is not below 1/N for the N pods connected.
    """
    resumed = _checkpoint(record_path, cfg, run_id) if resume else None
    previous, state = resumed if resumed else (None, None)
    current = state["version"] if state else registry.current_id
    if current is None:
        raise RunError("the registry has no model version to start from")
    version, adapter_bytes, signature = registry.get(current)
    best_id, best_ppl = current, float(version.metrics.get("perplexity", math.inf))
    nodes = _wait_for_pods(transport, cfg)
    population = len(nodes)
    dp = cfg.dp
    clip = dp.clip_norm
    first_round = 1
    ratchet = (SeedRatchet() if cfg.reproducible_seed is None
               else SeedRatchet.from_seed(cfg.reproducible_seed))
    if state:
        ratchet = SeedRatchet(bytes.fromhex(state["ratchet"]))
        clip, best_id, best_ppl = float(state["clip"]), state["best_id"], float(state["best_ppl"])
        population, first_round = int(state["population"]), int(state["round"]) + 1
    if dp.private and dp.delta >= 1.0 / population:
        raise InvalidInputError(
            f"delta {dp.delta:g} is not below 1/N = {1 / population:.3g} for the "
            f"{population} pods connected: at such a delta a mechanism that publishes one "
            "user's data outright would pass; choose a smaller --delta")
    expected = dp.sample_rate * population
    adaptive: AdaptiveClipping | None = dp.adaptive
    update_z = (adaptive.update_noise_multiplier(dp.noise_multiplier, expected)
                if adaptive and dp.private else dp.noise_multiplier)
    from covey.models import Adapter

    size = Adapter.from_bytes(adapter_bytes).num_parameters
    record: dict[str, Any] = previous or {
        "run_id": run_id, "started_at": utc_timestamp("seconds"), "config": cfg.to_dict(),
        "mechanism": dp.statement(expected), "randomness": _randomness(cfg, noise),
        "population": population, "rounds": [], "start_version": current,
    }

    def save(status: str) -> None:
        record["status"] = status
        record["finished_at"] = utc_timestamp("seconds") if status != "running" else None
        write_atomic(record_path, (json.dumps(record, indent=2) + "\n").encode())

    save("running")
    announce = getattr(transport, "announce", None)
    if first_round == 1 and dp.private and dp.mode == "central" and announce is not None:
        # Amplification by sampling is a guarantee over the draw: a user's loss is the
        # whole run's (z, q, T) whether or not the user is ever sampled. So every pod that
        # could be sampled is told of the run first and charges it then, not only those
        # the draw picks (which would count the sampling discount twice).
        first = _payload(cfg, registry, run_id, 1, clip, version, signature, adapter_bytes)
        told = announce(nodes, first, cfg.round_timeout)
        record["announced"] = {"pods": len(nodes), "charged": sum(not r.refusal for r in told),
                               "refused": dict(Counter(r.refusal for r in told if r.refusal))}
    for rnd in range(first_round, cfg.rounds + 1):
        t0 = time.monotonic()
        connected = sorted(transport.node_ids())
        round_seed = ratchet.advance()
        round_source = noise or round_noise(cfg, round_seed)
        sampled = poisson_sample(connected, dp.sample_rate, round_seed)
        payload = _payload(cfg, registry, run_id, rnd, clip, version, signature,
                           adapter_bytes)
        round_dp = payload.dp
        replies = transport.train(sampled, payload, cfg.round_timeout) if sampled else []
        refused = Counter(r.refusal for r in replies if r.refusal)
        updates = [PodUpdate(r.node_id, r.values, r.examples, r.version, r.clipped,
                             r.user_token)
                   for r in replies if not r.refusal and r.values is not None]
        result = aggregate(updates, size, version.id, round_dp, max(expected, 1e-9),
                           round_source, noise_multiplier=update_z)
        stats: dict[str, Any] = {
            "round": rnd, "connected": len(connected), "sampled": len(sampled),
            "replied": len(replies), "accepted": result.accepted,
            "rejected": dict(result.rejected), "refused": dict(refused),
            "timed_out": len(sampled) - len(replies), "clip_norm": clip,
            "noise_std_of_average": result.noise_std,
        }
        if result.accepted >= cfg.min_pods:
            base = Adapter.from_bytes(adapter_bytes)
            new_bytes = base.with_flat(base.flat() + result.delta).to_bytes()
            metrics = evaluator(new_bytes)
            eps = run_epsilon(cfg, rnd)
            new, new_sig = registry.add(new_bytes, parent=version.id, round=rnd, run_id=run_id,
                                        metrics=metrics, epsilon=eps if math.isfinite(eps)
                                        else -1.0)
            stats.update(version=new.id, **metrics)
            ppl = metrics.get("perplexity", math.inf)
            if ppl > best_ppl * (1 + ROLLBACK_TOLERANCE):
                stats["rolled_back_to"] = best_id
                version, adapter_bytes, signature = registry.get(best_id)
            else:
                version, adapter_bytes, signature = new, new_bytes, new_sig
                if ppl < best_ppl:
                    best_id, best_ppl = new.id, ppl
            registry.activate(version.id)
        else:
            stats["skipped"] = (f"{result.accepted} accepted updates, fewer than the "
                                f"{cfg.min_pods} required")
        if adaptive and dp.private:
            clip = adaptive.next_clip(clip, result.unclipped, result.accepted,
                                      max(expected, 1e-9), round_source)
        eps = run_epsilon(cfg, rnd)
        stats["epsilon"] = eps if math.isfinite(eps) else None
        stats["seconds"] = round(time.monotonic() - t0, 3)
        record["rounds"].append(stats)
        write_atomic(checkpoint_path(record_path), json.dumps({
            "run_id": run_id, "round": rnd, "ratchet": ratchet.state.hex(), "clip": clip,
            "best_id": best_id, "best_ppl": best_ppl, "version": version.id,
            "population": population}).encode())
        save("running")
        if on_round:
            on_round(stats)
    final = run_epsilon(cfg, cfg.rounds)
    record["epsilon"] = final if math.isfinite(final) else None
    record["delta"] = dp.delta
    if dp.private:
        other = "prv" if dp.accountant == "rdp" else "rdp"
        record["epsilon_check"] = {"accountant": other,
                                   "epsilon": run_epsilon(cfg, cfg.rounds, other)}
    record["final_version"] = version.id
    save("completed")
    checkpoint_path(record_path).unlink(missing_ok=True)
    return record
