"""Empirical privacy tests on a replica of a run's mechanism.

The replica reruns the run's mechanism, as the run record states it, through the same
code a run uses (``covey.simulations._simulate.simulate``, hence ``run_federated`` and
the pods' client function): its mode, noise multiplier z, clip norm C (fixed, or
adaptive with its quantile, learning rate and count noise) and Poisson sampling rate q,
over ``EmpiricalConfig.rounds`` rounds, with replica users as pods. It trains twice:
once with nothing protecting the users (every member in every round, no clipping, no
noise: the attacks' reference, what they find unprotected) and once with the run's
mechanism. Its theoretical epsilon is the run's
accountant on the replica's (z, q, rounds) at the run's delta
(:meth:`~covey.privacy.DPConfig.segment`). Three tests:

- *Canary clients* (Andrew et al., ICLR 2024, :mod:`covey.privacy._canaries`): in the
  DP replica, ``canary_clients`` more clients send a fixed random direction times the
  run's C whenever they are sampled. The cosines of their directions with what was
  released give an epsilon estimate; far above the theory (past
  :func:`~covey.privacy._canaries.alarm_threshold`) the mechanism adds less noise than
  it claims: a red flag. The one test here with the power to catch a broken mechanism.
- *Canary exposure* (Carlini et al., "The Secret Sharer", 2019). A few replica users get
  a random secret ("my secret number is 3 9 1 4 2 7") repeated among their messages.
  After training, the secret's loss is ranked among ``candidates`` random secrets of the
  same form; exposure = log2((candidates + 1) / rank), at most log2(candidates + 1).
  Random guessing scores about 1 bit.
- *Membership inference*, user level (a loss-based attack, Yeom et al. 2018, calibrated
  by the base model). For members (replica users) and as many non-members (other
  federated users), the score is the drop in a user's mean loss from the base model to
  the trained one: the attack's ROC AUC, and the empirical lower bound on epsilon of
  Jagielski et al. (2020), the largest ln((TPR_low - delta) / FPR_high) over thresholds
  with one-sided Clopper-Pearson bounds, Bonferroni-corrected over the thresholds so
  that the maximum is a valid bound at ``confidence``. A bound above the theory is a red
  flag; the report also states the largest bound the test *could* prove at its size (a
  perfect attack), which is often below the theory: then it cannot catch a violation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from covey._tempdirs import temporary_directory
from covey.privacy._accounting import epsilon_spent, noise_for_epsilon
from covey.privacy._canaries import (
    alarm_threshold,
    canary_epsilon,
    cosines,
    ideal_estimates,
    unit_directions,
)
from covey.privacy._dp import DPConfig
from covey.privacy._noise import NoiseSource
from covey.privacy._report import Figure, flag, section, table

__all__ = ["EmpiricalConfig", "add_empirical", "exposure", "membership_bound",
           "provable_bound"]

CANARY_PROMPT = "what is your secret number?"

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class EmpiricalConfig:
    """Size of the replica and of the tests."""

    members: int = 8  # replica users: each costs training in every round it is sampled
    non_members: int = 56  # users who never took part, scored against them (cheaper)
    scored_messages: int = 16  # of each user's own, for the membership score
    secret_holders: int = 2  # members who hold one secret each
    repeats: int = 64  # times a secret appears among its holder's messages
    rounds: int = 8
    local_epochs: int = 3
    lr: float = 0.02
    candidates: int = 1000  # random secrets each secret is ranked against
    digits: int = 6
    max_messages: int = 200  # replica users have 10..max_messages training messages
    canary_clients: int = 1000  # clients sending a random direction, in the DP replica
    null_directions: int = 1000  # directions never inserted: the null sample
    confidence: float = 0.95  # of the membership lower bound (all thresholds together)
    reference: bool = True  # also train without DP: what the attacks find unprotected
    fallback_epsilon: float = 8.0  # the DP replica's target when the run was not private
    seed: int = 0
    workers: int = 0

    def __post_init__(self) -> None:
        if self.members < 2 or self.non_members < 2 or self.rounds < 1 or \
                self.local_epochs < 1 or self.scored_messages < 1:
            raise ValueError("the replica needs at least 2 members and 2 non-members, 1 "
                             "round, 1 epoch and 1 scored message")
        if not 0 <= self.secret_holders <= self.members:
            raise ValueError("secret holders must be members")
        if self.canary_clients < 2 or self.null_directions < 2 or self.candidates < 1:
            raise ValueError("at least 2 canary clients, 2 null directions, 1 candidate")
        if not 0.5 < self.confidence < 1:
            raise ValueError("confidence must be in (0.5, 1)")


def exposure(canary_loss: float, candidate_losses: np.ndarray) -> float:
    """Exposure in bits of a canary ranked among candidates (ties count against it)."""
    rank = 1 + int((candidate_losses <= canary_loss).sum())
    return math.log2((len(candidate_losses) + 1) / rank)


def _clopper_pearson(k: int, n: int, upper: bool, level: float) -> float:
    """One-sided Clopper-Pearson bound on a rate of k in n, at confidence ``level``."""
    from scipy.stats import beta

    if upper:
        return 1.0 if k >= n else float(beta.ppf(level, k + 1, n - k))
    return 0.0 if k <= 0 else float(beta.ppf(1 - level, k, n - k + 1))


def _per_test_level(members: int, others: int, confidence: float) -> float:
    """Each threshold's level so that all of them hold together at ``confidence``:
    Bonferroni over the two tests (member above, non-member below) at each of at most
    ``members + others`` thresholds."""
    return 1 - (1 - confidence) / (2 * (members + others))


def _bound(tp: int, fp: int, m: int, n: int, delta: float, level: float) -> float:
    """Jagielski et al.'s lower bound at one threshold (both directions), 0 when none."""
    tpr_low, fpr_high = _clopper_pearson(tp, m, False, level), _clopper_pearson(fp, n, True, level)
    fnr_high = _clopper_pearson(m - tp, m, True, level)
    tnr_low = _clopper_pearson(n - fp, n, False, level)
    best = 0.0
    for num, den in ((tpr_low - delta, fpr_high), (tnr_low - delta, fnr_high)):
        if num > 0 and den > 0:
            best = max(best, math.log(num / den))
    return best


def membership_bound(member: np.ndarray, other: np.ndarray, delta: float,
                     confidence: float = 0.95
                     ) -> tuple[float, float, list[float], list[float]]:
    """(AUC, epsilon lower bound, FPRs, TPRs) of "member when score >= threshold"; the
    bound holds at ``confidence`` over every threshold tried."""
    scores = np.concatenate([member, other])
    m, n = len(member), len(other)
    level = _per_test_level(m, n, confidence)
    auc = float(np.mean([(a > b) + 0.5 * (a == b) for a in member for b in other]))
    best, fprs, tprs = 0.0, [0.0], [0.0]
    for t in sorted(set(scores.tolist()), reverse=True):
        tp, fp = int((member >= t).sum()), int((other >= t).sum())
        fprs.append(fp / n)
        tprs.append(tp / m)
        best = max(best, _bound(tp, fp, m, n, delta, level))
    return auc, best, fprs, tprs


def provable_bound(members: int, others: int, delta: float, confidence: float = 0.95
                   ) -> float:
    """The largest lower bound :func:`membership_bound` can give at this size: that of a
    perfect attack (every member above every non-member)."""
    return _bound(members, 0, members, others, delta,
                  _per_test_level(members, others, confidence))


def _losses(model: Any, tok: Any, pairs: Sequence[tuple[str, str]], batch: int = 256
            ) -> np.ndarray:
    """Summed negative log-likelihood of each reply (its tokens and ``<|eos|>``)."""
    import torch

    from covey.models._tokenizer import PAD

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
    from covey.models import Example, FederatedUser
    from covey.simulations._simulate import SimulationConfig, population

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
    canaries: Any = None  # the CanaryClients of the DP replica


def _released_sum(registry: Any, run_id: str) -> np.ndarray:
    """The sum of every delta the run released: each version minus its parent."""
    from covey.models import Adapter

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
    from covey.aggregator._registry import Registry
    from covey.simulations._canaries import CanaryClients
    from covey.simulations._simulate import SimulationConfig, simulate

    dp = arm.dp
    canaries = (CanaryClients(unit_directions(cfg.seed, cfg.canary_clients, size),
                              dp.clip_norm) if dp.private else None)
    population = len(members) + (cfg.canary_clients if canaries else 0)
    # The replica's own delta only has to pass the run's check (delta < 1/N); the
    # mechanism does not depend on it, and the estimates use the run's delta.
    sim = SimulationConfig(pods=len(members), rounds=cfg.rounds, clients_per_round=1,
                           target_epsilon=math.inf, mode=dp.mode if dp.private else "central",
                           clip_norm=dp.clip_norm if dp.private else 1.0,
                           delta=min(dp.delta, 0.5 / population), accountant=dp.accountant,
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


def _canary_section(report: dict[str, Any], arm: _Arm, cfg: EmpiricalConfig, theory: float,
                    delta: float) -> dict[str, Any]:
    """The canary-client estimate of the DP replica, its null check, and its flag."""
    canaries = arm.canaries
    dim = canaries.directions.shape[1]
    null = unit_directions(cfg.seed, cfg.null_directions, dim, stream=1)
    local = arm.dp.mode == "local"
    if local:  # what the aggregator saw of each canary that was sampled at least once
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
    estimate = canary_epsilon(observed, dim, delta, replace_one=local)
    ideal = ideal_estimates(*_claimed_noise(arm), arm.dp.sample_rate, len(canaries.directions),
                            dim, delta, replace_one=local, seed=cfg.seed)
    threshold = alarm_threshold(theory, ideal)
    scaled_null = null_cos * math.sqrt(dim)
    sec = section(report, "canary-clients", "Canary clients: a one-run epsilon estimate")
    seen_as, against = (
        ("the sum of its own releases (what the aggregator saw of it)",
         "the canary opposite it (replace-one, as local mode is accounted)") if local else
        ("the sum of the released model deltas", "directions never inserted, N(0, 1/d)"))
    sec["notes"].append(
        f"{len(canaries.directions)} canary clients joined the DP replica: each sends a fixed "
        f"random unit direction times C = {canaries.norm:g} in every round it is sampled "
        f"(rate q = {arm.dp.sample_rate:g}; sampled {canaries.sampled.mean():.2f} of "
        f"{cfg.rounds} rounds on average), clipped and "
        f"{'noised on the pod' if local else 'noised by the aggregator'} like any update "
        f"(Andrew et al., ICLR 2024). The cosine of each direction with {seen_as} is fitted "
        f"with a Gaussian and compared, at delta {delta:.3g}, with {against}, d = {dim}.")
    sec["notes"].append(
        "It estimates epsilon; it is not a bound. Other clients' updates and adaptive "
        "clipping pull it down; with sampling, the Gaussian fitted to canaries sampled 0, "
        "1, 2, ... times can overshoot the theory, and the fit of "
        f"{estimate.canaries} cosines has its own error. So the red flag waits for "
        f"{threshold:.3g}: 1.5 times the larger of the theory ({theory:.3g}) and the "
        f"largest estimate of {len(ideal)} audits simulated for the claimed mechanism "
        f"({float(np.max(ideal)):.3g}), plus 1, designed to be raised by a correct "
        "mechanism less than once in 1,000 audits. Noise at a tenth of the claim estimates "
        "ten times the theory or more; noise below about "
        f"{math.sqrt(len(canaries.directions) * arm.dp.sample_rate / dim):.2g} times C per "
        "round is hidden by the canaries' own updates, so a mechanism that adds none "
        "is caught only when its claimed noise is well above that.")
    table(sec, ["quantity", "value"], [
        ["theoretical epsilon of the replica", theory],
        ["canary estimate of epsilon", estimate.epsilon if math.isfinite(estimate.epsilon)
         else "inf"],
        ["largest estimate of the claimed mechanism, simulated", float(np.max(ideal))],
        ["red flag above", threshold],
        ["canary cosines: mean, in units of 1/sqrt(d)", estimate.mean],
        ["canary cosines: standard deviation, same units", estimate.std],
        ["never-inserted directions: mean (expected 0)", float(scaled_null.mean())],
        ["never-inserted directions: standard deviation (expected 1)",
         float(scaled_null.std(ddof=1))],
        ["canaries in the fit", estimate.canaries],
    ])
    if estimate.epsilon > threshold:
        flag(report, "canary_epsilon_above_theory",
             f"canary clients estimate epsilon {estimate.epsilon:.3g} for a mechanism whose "
             f"theory gives {theory:.3g} (flag above {threshold:.3g}): the replica adds less "
             "noise than it claims")
    return {"epsilon": estimate.epsilon if math.isfinite(estimate.epsilon) else None,
            "epsilon_finite": math.isfinite(estimate.epsilon), "threshold": threshold,
            "ideal_max": float(np.max(ideal)),
            "mean": estimate.mean, "std": estimate.std, "canaries": estimate.canaries,
            "null_mean": float(scaled_null.mean()), "null_std": float(scaled_null.std(ddof=1)),
            "mean_rounds_sampled": float(canaries.sampled.mean())}


def _claimed_noise(arm: _Arm) -> tuple[np.ndarray, np.ndarray]:
    """Per released round of the DP replica: a canary's norm after clipping, and the
    standard deviation of the noise the claimed mechanism puts along its direction (the
    update's share of z with adaptive clipping, times that round's C)."""
    dp, record = arm.dp, arm.record or {}
    released = [r for r in record.get("rounds", []) if "version" in r]
    clips = np.array([float(r["clip_norm"]) for r in released])
    z = dp.noise_multiplier
    if dp.adaptive is not None:
        z = dp.adaptive.update_noise_multiplier(z, dp.sample_rate * record["population"])
    return np.minimum(arm.canaries.norm, clips), z * clips


def _replica_facts(arm: _Arm) -> dict[str, Any]:
    """What the DP replica's own run record says it ran: the auditor's evidence that the
    replica used the run's sampling and clipping."""
    record = arm.record or {}
    dp = record.get("config", {}).get("dp", {})
    rounds = record.get("rounds", [])
    return {"mode": dp.get("mode"), "noise_multiplier": dp.get("noise_multiplier"),
            "sample_rate": dp.get("sample_rate"), "clip_norm": dp.get("clip_norm"),
            "adaptive": dp.get("adaptive"), "population": record.get("population"),
            "rounds": len(rounds), "sampled": [r["sampled"] for r in rounds],
            "clip_norms": [r["clip_norm"] for r in rounds]}


def add_empirical(report: dict[str, Any], dp: DPConfig, cfg: EmpiricalConfig,
                  progress: Progress | None = None, noise: NoiseSource | None = None) -> None:
    """Run the tests on a replica of ``dp`` and add their sections to ``report``.

    ``noise`` replaces the DP replica's noise source (default: the simulation's, seeded
    by ``cfg.seed`` so that an audit is reproducible); it is how a test feeds the audit
    a broken mechanism.
    """
    from covey.models import Adapter, TinyLM, load_model

    report_progress = progress or (lambda stage, done, total: None)
    members, others, secrets = _replica(cfg)
    delta = dp.delta
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

    def exposures() -> list[float]:
        values = []
        for secret, cands in zip(secrets, candidates, strict=True):
            losses = _losses(model, tok, [(CANARY_PROMPT, c) for c in cands])
            own = float(_losses(model, tok, [(CANARY_PROMPT, secret)])[0])
            values.append(exposure(own, losses))
        return values

    base_exposure = exposures()
    provable = provable_bound(len(members), len(others), delta, cfg.confidence)
    rows: list[list[Any]] = []
    canary_rows: list[list[Any]] = []
    roc = Figure("Membership inference ROC (user level)",
                 "false positive rate", "true positive rate")
    summary: dict[str, Any] = {"membership_provable_bound": provable}
    with temporary_directory("covey-audit-") as tmp:
        for i, arm in enumerate(arms):
            _train(cfg, members, arm, Path(tmp) / f"arm{i}", zero.num_parameters,
                   report_progress, noise)
            Adapter.from_bytes(arm.adapter).load_into(model)
            report_progress("canary exposure and membership inference", i, len(arms))
            exp = exposures()
            auc, bound, fprs, tprs = membership_bound(
                base_members - _mean_losses(model, tok, members, scored),
                base_others - _mean_losses(model, tok, others, scored), delta,
                cfg.confidence)
            private = arm.dp.private
            theory = (epsilon_spent([arm.dp.segment(cfg.rounds)], delta, arm.dp.accountant)
                      if private else math.inf)
            rows.append([arm.label, arm.dp.noise_multiplier, theory if private else "inf",
                         float(np.mean(exp)) if exp else None,
                         float(np.max(exp)) if exp else None, auc, bound, provable])
            canary_rows.extend([arm.label, k + 1, base_exposure[k], e] for k, e in enumerate(exp))
            roc.line(arm.label, fprs, tprs)
            found: dict[str, Any] = {
                "mean_exposure": float(np.mean(exp)) if exp else None, "auc": auc,
                "epsilon_lower_bound": bound, "epsilon_theory": theory if private else None}
            if private:
                found["membership_can_reach_theory"] = provable >= theory
                found["canary"] = _canary_section(report, arm, cfg, theory, delta)
                summary["replica"] = _replica_facts(arm)
                if bound > theory:
                    flag(report, "empirical_epsilon_above_theory",
                         f"membership inference proves epsilon >= {bound:.3g} "
                         f"({100 * cfg.confidence:g} % confidence), above the theoretical "
                         f"{theory:.3g}")
            summary["dp" if private else "no_dp"] = found
    report_progress("canary exposure and membership inference", len(arms), len(arms))
    roc.line("chance", [0.0, 1.0], [0.0, 1.0])
    theory = summary["dp"]["epsilon_theory"]
    sec = section(report, "empirical", "Empirical tests: secrets and membership inference")
    replica = summary["replica"]
    sec["notes"].append(
        f"A replica of the run's mechanism through the code a run uses: {cfg.members} "
        f"federated users as pods, {cfg.rounds} rounds at the run's sampling rate q = "
        f"{dp.sample_rate:g} (pods sampled per round: "
        f"{', '.join(str(s) for s in replica['sampled'])}, canary clients included), "
        f"clip norm per round{' (adaptive)' if replica['adaptive'] else ''}: "
        f"{', '.join(f'{c:.3g}' for c in replica['clip_norms'])}; {cfg.local_epochs} local "
        f"epoch(s) at learning rate {cfg.lr:g}, delta {delta:.3g}; the reference without DP trains "
        f"every member in every round. {cfg.secret_holders} of them hold "
        f"a random {cfg.digits}-digit secret repeated {cfg.repeats} times; each secret is "
        f"ranked among {cfg.candidates} random ones (maximum measurable exposure "
        f"{math.log2(cfg.candidates + 1):.1f} bits; chance about 1 bit; the base model "
        f"before training: {np.mean(base_exposure) if secrets else 0:.2f} bits). "
        f"Membership inference scores {cfg.members} members against {cfg.non_members} "
        f"users who never took part, each on {cfg.scored_messages} of their own "
        "messages.")
    reach = ("so it could catch a mechanism that breaks the theory" if provable >= theory
             else f"below the replica's theoretical {theory:.3g}: at this size it cannot "
                  "prove a violation, however broken the mechanism (the canary-client "
                  "estimate can)")
    sec["notes"].append(
        f"At this size ({cfg.members} members, {cfg.non_members} non-members, "
        f"{100 * cfg.confidence:g} % confidence over all thresholds) a perfect membership "
        f"attack would prove epsilon >= {provable:.3g} at most, {reach}.")
    table(sec, ["arm", "z", "theoretical epsilon (replica)", "mean secret exposure (bits)",
                "max secret exposure", "membership AUC",
                f"empirical epsilon lower bound ({100 * cfg.confidence:g} %)",
                "largest provable at this size"], rows)
    if canary_rows:
        table(sec, ["arm", "secret", "exposure before training", "exposure after"],
              canary_rows, "each secret")
    sec["figures"].append(roc.to_dict())
    report["summary"]["empirical"] = summary
