"""Federated simulations on one machine: every federated user of the dataset is a pod.

The ``fast`` engine runs the aggregator's own ``run_federated`` (sampling, checks,
DP-FedAvg, evaluation, signed versions, rollback, accounting, the run record) over
in-memory pods that call the same client training function as a real pod
(:func:`covey.device.federation._federated.train_update`). Pods hold their user's examples in
memory; there is no store, network or Flower process, so the figures measure learning
and privacy, not transport. The ``flower`` engine runs the same rounds in Flower's
Simulation Runtime (see :mod:`covey.simulations._engines`).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from covey._files import write_atomic
from covey.aggregator import RunConfig, Transport, run_federated
from covey.errors import InvalidInputError
from covey.models import resolve_precision
from covey.privacy import DPConfig, NoiseSource
from covey.simulations._config import SimulationConfig
from covey.simulations._engines import ENGINES, EngineRun
from covey.simulations._personalize import personalized
from covey.simulations._pool import MemoryPods
from covey.simulations._population import eval_sample, population, population_summary
from covey.simulations._sizing import check_memory

if TYPE_CHECKING:
    from covey.simulations._canaries import CanaryClients

__all__ = ["simulate"]


def _dp(cfg: SimulationConfig, pods: int) -> DPConfig:
    """The run's DP settings for a population of ``pods``: the given noise multiplier,
    none (an infinite target epsilon), or the one that meets the target."""
    q = cfg.sample_rate or min(1.0, cfg.clients_per_round / pods)
    delta = cfg.delta or 0.1 / pods
    if cfg.noise_multiplier:
        return DPConfig(mode=cfg.mode, noise_multiplier=cfg.noise_multiplier,  # type: ignore[arg-type]
                        clip_norm=cfg.clip_norm, sample_rate=q, delta=delta,
                        accountant=cfg.accountant, adaptive=cfg.adaptive)
    if math.isinf(cfg.target_epsilon) or cfg.noise_multiplier == 0:
        return DPConfig(mode="central", noise_multiplier=0.0, clip_norm=math.inf,
                        sample_rate=q, delta=delta, accountant=cfg.accountant)
    dp = DPConfig(mode=cfg.mode, clip_norm=cfg.clip_norm, sample_rate=q,  # type: ignore[arg-type]
                  delta=delta, accountant=cfg.accountant, adaptive=cfg.adaptive)
    try:
        return dp.solved(cfg.target_epsilon, cfg.rounds)
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from None


def _unfinished(out: Path) -> str | None:
    """The run id of an interrupted simulation in ``out``, if any."""
    for path in sorted((out / "runs").glob("*.json")) if (out / "runs").exists() else []:
        try:
            if json.loads(path.read_text()).get("status") == "running":
                return path.stem
        except ValueError:
            continue
    return None


def simulate(cfg: SimulationConfig, out: Path,
             on_round: Callable[[dict[str, Any]], None] | None = None,
             resume: bool = False, users: Sequence[Any] | None = None,
             noise: NoiseSource | None = None, canaries: CanaryClients | None = None
             ) -> dict[str, Any]:
    """Run a simulation; writes population.json, the registry and the run record to ``out``.

    Every round is checkpointed beside the run record, never in it (the sampling
    ratchet's state, never the noise's; owner-only, removed when the run completes);
    ``resume`` continues an interrupted run in ``out`` (same configuration): with
    ``--seed`` it gives the same result as an uninterrupted run, else fresh noise.
    ``users`` replaces the dataset's population (the privacy audit plants secrets in
    some users' data this way); ``noise`` replaces every noise source of the run, the
    aggregator's and the pods' (it must hold no state a copy would repeat: worker
    processes get copies); ``canaries`` adds canary clients to the pods (see
    :mod:`covey.simulations._canaries`). The three run on the fast engine, for the
    privacy audit's replica of a run's mechanism.

    Raises:
        InvalidInputError: an impossible configuration (before any work), or nothing to
            resume.
    """
    from covey.models import load_model

    if resume and _unfinished(out) is None:
        raise InvalidInputError(f"no interrupted simulation to resume in {out}")
    given = users is not None
    users = list(users) if users is not None else population(cfg)
    if cfg.clients_per_round > len(users):
        raise InvalidInputError(f"{cfg.clients_per_round} clients per round but only "
                                f"{len(users)} pods")
    if (given or noise is not None or canaries is not None) and not cfg.in_memory_pods:
        raise InvalidInputError("a given population, noise or canaries run on the fast "
                                "engine's in-memory pods")
    dp = _dp(cfg, len(users))
    workers = cfg.workers or (os.cpu_count() or 1)
    check_memory(cfg, workers)
    model, tok, _ = load_model()
    # The fast engine's workers start now: they load while this process sets up, and
    # evaluate every version as well as train the pods.
    pods = MemoryPods(users, model, tok, cfg, workers, given, noise) if cfg.in_memory_pods \
        else None
    try:
        return _simulate(cfg, out, users, dp, workers, model, tok, pods, on_round, resume,
                         noise, canaries)
    finally:
        if pods is not None:
            pods.close()


def _simulate(cfg: SimulationConfig, out: Path, users: Sequence[Any], dp: DPConfig,
              workers: int, model: Any, tok: Any, pods: MemoryPods | None,
              on_round: Callable[[dict[str, Any]], None] | None, resume: bool,
              noise: NoiseSource | None = None, canaries: CanaryClients | None = None
              ) -> dict[str, Any]:
    from covey.aggregator import AdapterEvaluator, Registry

    out.mkdir(parents=True, exist_ok=True)
    summary = population_summary(users, tok)
    (out / "population.json").write_text(json.dumps(summary, indent=2) + "\n")
    chosen = [example for _, example in
              eval_sample(users, cfg, np.random.default_rng(cfg.choice_seed))]
    pool = pods.pool if pods is not None else None
    evaluator = AdapterEvaluator(chosen, threads=os.cpu_count() or 1, model=model, tok=tok,
                                 spread=pods.tally if pods is not None and pool is not None
                                 else None, parts=workers)
    registry = Registry(out / "registry")
    unfinished = _unfinished(out) if resume else None
    if unfinished is not None:
        run_id = unfinished
        first = next(v for v in registry.versions() if v.round == 0 and v.run_id == run_id)
    else:
        run_id = f"sim-{time.strftime('%Y%m%d-%H%M%S')}-{cfg.choice_seed}"
        initial = evaluator.initial_adapter(cfg.choice_seed)
        first, _ = registry.add(initial, parent=None, round=0, run_id=run_id,
                                metrics=evaluator(initial), epsilon=0.0)
        registry.activate(first.id)
    run = RunConfig(rounds=cfg.rounds, dp=dp, target_epsilon=cfg.target_epsilon
                    if math.isfinite(cfg.target_epsilon) else None, min_pods=1,
                    round_timeout=3600.0, wait_timeout=1.0, local_epochs=cfg.local_epochs,
                    lr=cfg.lr, max_examples=cfg.max_examples, eval_examples=len(chosen),
                    seed=cfg.choice_seed, precision=resolve_precision(cfg.precision),
                    reproducible_seed=cfg.seed)
    (out / "runs").mkdir(exist_ok=True)
    started = time.perf_counter()

    def rounds(transport: Transport) -> dict[str, Any]:
        return run_federated(transport, registry, run, run_id, evaluator,
                             out / "runs" / f"{run_id}.json", on_round=on_round,
                             resume=resume, noise=noise)

    record = ENGINES[cfg.engine](EngineRun(cfg, users, model, tok, out, registry.public_key,
                                           workers, dp.delta, pods, noise, canaries), rounds)
    seconds = time.perf_counter() - started
    # The fast engine's workers, still up, share the personal fine-tuning.
    personal = (personalized(cfg, users, registry.get(record["final_version"])[1], pool)
                if cfg.personalize else None)
    updates = sum(r["accepted"] for r in record["rounds"])
    final = registry.get(record["final_version"])[0]
    record.update(simulation={**asdict(cfg), "precision": run.precision,
                              "population": summary, "engine": cfg.engine,
                              "base_metrics": first.metrics,
                              "global_metrics": final.metrics,
                              "personalized_metrics": personal,
                              "seconds": round(seconds, 2),
                              "client_updates": updates,
                              "updates_per_second": round(updates / seconds, 3),
                              "workers": workers,
                              "worker_allocator": pods.allocator() if pods else None})
    write_atomic(out / "runs" / f"{run_id}.json", (json.dumps(record, indent=2) + "\n").encode())
    record["record_path"] = str(out / "runs" / f"{run_id}.json")
    return record
