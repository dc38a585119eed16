"""The empirical replica of a run's mechanism, for ``covey audit --run``.

The replica reruns the run's mechanism, as the run record states it, through the same
code a run uses (:func:`~covey.simulations._simulate.simulate`, hence ``run_federated``
and the pods' client function): its mode, noise multiplier z, clip norm C (fixed, or
adaptive with its quantile, learning rate and count noise) and Poisson sampling rate q,
over ``EmpiricalConfig.rounds`` rounds, with replica users as pods. It trains twice:
once with nothing protecting the users (every member in every round, no clipping, no
noise: the attacks' reference, what they find unprotected) and once with the run's
mechanism, with canary clients (:class:`~covey.simulations._canaries.CanaryClients`)
among the pods. A few members hold a random secret repeated among their messages.

What it hands the audit is scores only (:class:`covey.privacy.ReplicaScores`): the
losses of the secrets and of random candidates, each user's drop in loss, the canaries'
cosines with what was released. :func:`covey.privacy.add_empirical` turns them into
exposure, membership bounds and the canary estimate, and judges them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from covey._tempdirs import temporary_directory
from covey.aggregator import Registry, run_audit
from covey.models import Adapter, Example, FederatedUser
from covey.privacy import (
    ArmScores,
    CanaryScores,
    DPConfig,
    EmpiricalConfig,
    NoiseSource,
    ReplicaScores,
    SecretLosses,
    add_empirical,
    cosines,
    noise_for_epsilon,
    run_report,
    unit_directions,
)
from covey.simulations._canaries import CanaryClients
from covey.simulations._config import SimulationConfig
from covey.simulations._population import population
from covey.simulations._simulate import simulate

__all__ = ["audit_run", "replica_scores"]

CANARY_PROMPT = "what is your secret number?"

Progress = Callable[[str, int, int], None]


def _losses(model: Any, tok: Any, pairs: Sequence[tuple[str, str]], batch: int = 256
            ) -> np.ndarray:
    """Summed negative log-likelihood of each reply (its tokens and ``<|eos|>``)."""
    import torch

    from covey.models import PAD

    rows = [tok.example(c, r) for c, r in pairs]
    # Rows of alike length share a batch: less padding to compute.
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    out = np.zeros(len(rows))
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            chunk = [rows[j] for j in order[i:i + batch]]
            width = min(max(len(ids) for ids, _ in chunk) - 1, model.cfg.context)
            ids = torch.full((len(chunk), width), PAD, dtype=torch.long)
            targets = torch.full((len(chunk), width), -100, dtype=torch.long)
            for k, (seq, start) in enumerate(chunk):
                cut = max(0, len(seq) - (model.cfg.context + 1))  # keep the last tokens
                seq, start = seq[cut:], max(1, start - cut)
                ids[k, :len(seq) - 1] = torch.tensor(seq[:-1])
                targets[k, start - 1:len(seq) - 1] = torch.tensor(seq[start:])
            logp = torch.log_softmax(model(ids)[0].float(), dim=-1)
            mask = targets >= 0
            picked = logp.gather(2, targets.clamp(min=0)[..., None])[..., 0] * mask
            out[order[i:i + len(chunk)]] = (-picked.sum(dim=1)).numpy()
    return out


def _secret(rng: np.random.Generator, digits: int) -> str:
    return "my secret number is " + " ".join(str(int(d)) for d in rng.integers(0, 10, digits))


def _replica(cfg: EmpiricalConfig) -> tuple[list[Any], list[Any], list[str]]:
    """Members (the first ``secret_holders`` holding secrets), non-members, the secrets."""
    pool = [u for u in population(SimulationConfig(min_messages=10))
            if len(u.train) <= cfg.max_messages]
    wanted = cfg.members + cfg.non_members
    if len(pool) < max(wanted, 2 * cfg.members):
        raise ValueError(f"only {len(pool)} users fit the replica; asked for {wanted}")
    rng = np.random.default_rng(cfg.seed)
    # Members and as many non-members first, then more non-members from the rest: the
    # members do not depend on how many non-members are scored.
    first = rng.choice(len(pool), 2 * cfg.members, replace=False)
    secrets = [_secret(rng, cfg.digits) for _ in range(cfg.secret_holders)]
    rest = np.setdiff1d(np.arange(len(pool)), first)
    more = np.random.default_rng([cfg.seed, 1]).choice(
        rest, max(0, cfg.non_members - cfg.members), replace=False)
    members = [pool[i] for i in first[:cfg.members]]
    others = [pool[i] for i in [*first[cfg.members:cfg.members + cfg.non_members], *more]]
    for i, secret in enumerate(secrets):
        user = members[i]
        planted = tuple(Example(CANARY_PROMPT, secret, "") for _ in range(cfg.repeats))
        members[i] = FederatedUser(user.user_id, user.train + planted, user.test)
    return members, others, secrets


@dataclass
class _Arm:
    """One training of the replica: its mechanism and what it left behind."""

    label: str
    dp: DPConfig
    adapter: bytes = b""
    record: dict[str, Any] | None = None
    released: np.ndarray | None = None  # central: the sum of the released deltas
    canaries: CanaryClients | None = None  # the DP replica's


def _released_sum(registry: Registry, run_id: str) -> np.ndarray:
    """The sum of every delta the run released: each version minus its parent."""
    total: np.ndarray | None = None
    for version in registry.versions():
        if version.run_id != run_id or version.parent is None:
            continue
        new = Adapter.from_bytes(registry.get(version.id)[1]).flat().astype(np.float64)
        old = Adapter.from_bytes(registry.get(version.parent)[1]).flat().astype(np.float64)
        total = new - old if total is None else total + (new - old)
    if total is None:
        raise ValueError(f"the replica run {run_id} released no version")
    return total


def _train(cfg: EmpiricalConfig, members: list[Any], arm: _Arm, out: Path, size: int,
           progress: Progress, noise: NoiseSource | None) -> None:
    """Train the replica under ``arm.dp`` (with canary clients in ``size`` dimensions
    when private)."""
    dp = arm.dp
    canaries = (CanaryClients(unit_directions(cfg.seed, cfg.canary_clients, size),
                              dp.clip_norm) if dp.private else None)
    pods = len(members) + (cfg.canary_clients if canaries else 0)
    # The replica's own delta only has to pass the run's check (delta < 1/N); the
    # mechanism does not depend on it, and the estimates use the run's delta.
    sim = SimulationConfig(pods=len(members), rounds=cfg.rounds, clients_per_round=1,
                           target_epsilon=math.inf, mode=dp.mode if dp.private else "central",
                           clip_norm=dp.clip_norm if dp.private else 1.0,
                           delta=min(dp.delta, 0.5 / pods), accountant=dp.accountant,
                           local_epochs=cfg.local_epochs, lr=cfg.lr, max_examples=10_000,
                           eval_examples=20, seed=cfg.seed, workers=cfg.workers,
                           noise_multiplier=dp.noise_multiplier if dp.private else 0.0,
                           sample_rate=dp.sample_rate,
                           adaptive=dp.adaptive if dp.private else None,
                           personalize=False)
    done = [0]
    label = f"training replica: {arm.label}"

    def on_round(_: dict[str, Any]) -> None:
        done[0] += 1
        progress(label, done[0], cfg.rounds)

    progress(label, 0, cfg.rounds)
    record = simulate(sim, out, on_round=on_round, users=members,
                      noise=noise if dp.private else None, canaries=canaries)
    registry = Registry(out / "registry")
    # The mechanism's output is the last released aggregate, rolled back or not.
    last = max((v for v in registry.versions() if v.run_id == record["run_id"]),
               key=lambda v: v.round)
    arm.adapter, arm.record, arm.canaries = registry.get(last.id)[1], record, canaries
    if canaries is not None and dp.mode == "central":
        arm.released = _released_sum(registry, record["run_id"])


def _own_messages(user: Any, per_user: int) -> list[tuple[str, str]]:
    """The (context, reply) pairs membership is scored on: the user's, not a secret."""
    return [(e.context, e.reply) for e in user.train if e.context != CANARY_PROMPT][:per_user]


def _mean_losses(model: Any, tok: Any, users: Sequence[Any], per_user: int) -> np.ndarray:
    """Each user's mean loss on their own scored messages, batched across users."""
    pairs = [_own_messages(u, per_user) for u in users]
    losses = _losses(model, tok, [p for own in pairs for p in own])
    ends = np.cumsum([len(own) for own in pairs])
    return np.asarray([chunk.mean() for chunk in np.split(losses, ends[:-1])])


def _arms(dp: DPConfig, cfg: EmpiricalConfig) -> list[_Arm]:
    """The replica's trainings: the reference without DP (if asked), then the DP one."""
    if dp.private:
        arm = _Arm(f"DP, the run's mechanism (z = {dp.noise_multiplier:.3g}, "
                   f"C = {dp.clip_norm:g}{', adaptive' if dp.adaptive else ''}, "
                   f"q = {dp.sample_rate:g}, {dp.mode})", dp)
    else:
        z = noise_for_epsilon(cfg.fallback_epsilon, dp.delta, dp.sample_rate, cfg.rounds,
                              dp.accountant)
        arm = _Arm(f"DP at epsilon {cfg.fallback_epsilon:g} (z = {z:.3g}, C = 1, "
                   f"q = {dp.sample_rate:g})", DPConfig(
                       mode="central", noise_multiplier=z, clip_norm=1.0,
                       sample_rate=dp.sample_rate, delta=dp.delta, accountant=dp.accountant))
    # The reference protects nothing: every member in every round, no clipping, no noise.
    reference = _Arm("no DP (every member every round)", DPConfig(
        mode="central", noise_multiplier=0.0, clip_norm=math.inf, sample_rate=1.0,
        delta=dp.delta, accountant=dp.accountant))
    return [reference, arm] if cfg.reference else [arm]


def _canary_scores(arm: _Arm, cfg: EmpiricalConfig) -> CanaryScores:
    """The DP replica's canaries: the cosine of each with what the aggregator saw of it,
    and of directions never inserted with the same."""
    canaries = arm.canaries
    if canaries is None:
        raise ValueError("only the DP replica has canary clients")
    dim = canaries.directions.shape[1]
    null = unit_directions(cfg.seed, cfg.null_directions, dim, stream=1)
    if arm.dp.mode == "local":  # what the aggregator saw of each canary sampled at least once
        seen = canaries.sampled > 0
        released = canaries.released[seen] if canaries.released is not None \
            else np.zeros((0, dim))
        observed = cosines(canaries.directions[seen], released)
        paired = min(len(null), len(released))
        null_cos = cosines(null[:paired], released[:paired])
    else:
        total = arm.released if arm.released is not None else np.zeros(dim)
        observed = cosines(canaries.directions, total)
        null_cos = cosines(null, total)
    return CanaryScores(observed=observed, null=null_cos, dim=dim,
                        clients=len(canaries.directions), norm=canaries.norm,
                        mean_rounds_sampled=float(canaries.sampled.mean()))


def replica_scores(dp: DPConfig, cfg: EmpiricalConfig, progress: Progress | None = None,
                   noise: NoiseSource | None = None) -> ReplicaScores:
    """Train the replica of ``dp`` and score it.

    ``noise`` replaces the DP replica's noise source (default: the simulation's, seeded
    by ``cfg.seed`` so that an audit is reproducible); it is how a test feeds the audit
    a broken mechanism.
    """
    from covey.models import TinyLM, load_model  # torch: only when the replica trains

    report_progress = progress or (lambda stage, done, total: None)
    members, others, secrets = _replica(cfg)
    arms = _arms(dp, cfg)
    model, tok, _ = load_model()
    zero = Adapter.zeros_like(TinyLM(model.cfg))
    zero.load_into(model)
    rng = np.random.default_rng(cfg.seed + 1)
    candidates = [[_secret(rng, cfg.digits) for _ in range(cfg.candidates)] for _ in secrets]
    candidates = [[c for c in cands if c != s] for cands, s in zip(candidates, secrets,
                                                                    strict=True)]
    scored = cfg.scored_messages
    base_members = _mean_losses(model, tok, members, scored)
    base_others = _mean_losses(model, tok, others, scored)

    def secret_losses() -> SecretLosses:
        return SecretLosses(
            [float(_losses(model, tok, [(CANARY_PROMPT, s)])[0]) for s in secrets],
            [_losses(model, tok, [(CANARY_PROMPT, c) for c in cands]) for cands in candidates])

    before = secret_losses()
    scores: list[ArmScores] = []
    with temporary_directory("covey-audit-") as tmp:
        for i, arm in enumerate(arms):
            _train(cfg, members, arm, Path(tmp) / f"arm{i}", zero.num_parameters,
                   report_progress, noise)
            Adapter.from_bytes(arm.adapter).load_into(model)
            report_progress("canary exposure and membership inference", i, len(arms))
            scores.append(ArmScores(
                label=arm.label, dp=arm.dp, record=arm.record or {},
                secrets=secret_losses(),
                members=base_members - _mean_losses(model, tok, members, scored),
                non_members=base_others - _mean_losses(model, tok, others, scored),
                canaries=_canary_scores(arm, cfg) if arm.canaries is not None else None))
    report_progress("canary exposure and membership inference", len(arms), len(arms))
    return ReplicaScores(before=before, arms=scores)


def audit_run(path: Path, empirical: bool = False, progress: Progress | None = None,
              config: EmpiricalConfig | None = None, noise: NoiseSource | None = None
              ) -> dict[str, Any]:
    """The privacy report of the run record at ``path`` (a file, or a folder holding
    ``runs/``), with the empirical tests on a replica of its mechanism if ``empirical``
    (sized by ``config``; ``noise``: see :func:`replica_scores`)."""
    run = run_audit(path)
    report = run_report(run)
    if empirical:
        cfg = config or EmpiricalConfig()
        add_empirical(report, run.dp, cfg, replica_scores(run.dp, cfg, progress, noise))
    return report
