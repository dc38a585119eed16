"""Empirical privacy tests on a replica of a run's mechanism: their statistics and report.

The replica (``covey audit --run``, trained through the simulator) reruns the run's
mechanism, as the run record states it: its mode, noise multiplier z, clip norm C (fixed,
or adaptive) and Poisson sampling rate q, over ``EmpiricalConfig.rounds`` rounds, once
with nothing protecting the users (the attacks' reference) and once with the run's
mechanism. It hands over scores only (:class:`ReplicaScores`); this module turns them
into three tests. The replica's theoretical epsilon is the run's accountant on its (z,
q, rounds) at the run's delta (:meth:`~covey.privacy.DPConfig.segment`).

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
from dataclasses import dataclass
from typing import Any

import numpy as np

from covey.privacy._accounting import epsilon_spent
from covey.privacy._canaries import alarm_threshold, canary_epsilon, ideal_estimates
from covey.privacy._dp import DPConfig
from covey.privacy._report import Figure, flag, section, table

__all__ = ["ArmScores", "CanaryScores", "EmpiricalConfig", "ReplicaScores", "SecretLosses",
           "add_empirical", "exposure", "membership_bound", "provable_bound"]


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


@dataclass(frozen=True)
class SecretLosses:
    """The loss of each planted secret, and of the random candidates it is ranked
    against, under one model."""

    secrets: list[float]
    candidates: list[np.ndarray]  # one array per secret

    def exposures(self) -> list[float]:
        """Each secret's exposure, in bits."""
        return [exposure(own, others)
                for own, others in zip(self.secrets, self.candidates, strict=True)]


@dataclass(frozen=True)
class CanaryScores:
    """The DP replica's canary clients: cosines with what was released."""

    observed: np.ndarray  # each canary's direction (local: each one sampled) and the release
    null: np.ndarray  # directions never inserted, against the same
    dim: int
    clients: int  # canary clients in the replica
    norm: float  # each sends its direction times this (the run's initial C)
    mean_rounds_sampled: float


@dataclass(frozen=True)
class ArmScores:
    """One training of the replica: its mechanism, its own run record and its scores."""

    label: str
    dp: DPConfig
    record: dict[str, Any]
    secrets: SecretLosses
    members: np.ndarray  # each member's drop in mean loss from the base model
    non_members: np.ndarray  # likewise, for users who never took part
    canaries: CanaryScores | None  # in the DP replica only


@dataclass(frozen=True)
class ReplicaScores:
    """What the replica hands the audit: the secrets' losses under the base model, and
    each training's scores (the reference without DP first, if trained)."""

    before: SecretLosses
    arms: list[ArmScores]

    def __post_init__(self) -> None:
        if not self.arms:
            raise ValueError("a replica trains at least once")


def _canary_section(report: dict[str, Any], arm: ArmScores, canaries: CanaryScores,
                    cfg: EmpiricalConfig, theory: float, delta: float) -> dict[str, Any]:
    """The canary-client estimate of the DP replica, its null check, and its flag."""
    dim = canaries.dim
    local = arm.dp.mode == "local"
    estimate = canary_epsilon(canaries.observed, dim, delta, replace_one=local)
    ideal = ideal_estimates(*_claimed_noise(arm, canaries), arm.dp.sample_rate,
                            canaries.clients, dim, delta, replace_one=local, seed=cfg.seed)
    threshold = alarm_threshold(theory, ideal)
    scaled_null = canaries.null * math.sqrt(dim)
    sec = section(report, "canary-clients", "Canary clients: a one-run epsilon estimate")
    seen_as, against = (
        ("the sum of its own releases (what the aggregator saw of it)",
         "the canary opposite it (replace-one, as local mode is accounted)") if local else
        ("the sum of the released model deltas", "directions never inserted, N(0, 1/d)"))
    sec["notes"].append(
        f"{canaries.clients} canary clients joined the DP replica: each sends a fixed "
        f"random unit direction times C = {canaries.norm:g} in every round it is sampled "
        f"(rate q = {arm.dp.sample_rate:g}; sampled {canaries.mean_rounds_sampled:.2f} of "
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
        f"{math.sqrt(canaries.clients * arm.dp.sample_rate / dim):.2g} times C per "
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
            "mean_rounds_sampled": canaries.mean_rounds_sampled}


def _claimed_noise(arm: ArmScores, canaries: CanaryScores) -> tuple[np.ndarray, np.ndarray]:
    """Per released round of the DP replica: a canary's norm after clipping, and the
    standard deviation of the noise the claimed mechanism puts along its direction (the
    update's share of z with adaptive clipping, times that round's C)."""
    dp, record = arm.dp, arm.record
    released = [r for r in record.get("rounds", []) if "version" in r]
    clips = np.array([float(r["clip_norm"]) for r in released])
    z = dp.noise_multiplier
    if dp.adaptive is not None:
        z = dp.adaptive.update_noise_multiplier(z, dp.sample_rate * record["population"])
    return np.minimum(canaries.norm, clips), z * clips


def _replica_facts(arm: ArmScores) -> dict[str, Any]:
    """What the DP replica's own run record says it ran: the auditor's evidence that the
    replica used the run's sampling and clipping."""
    record = arm.record
    dp = record.get("config", {}).get("dp", {})
    rounds = record.get("rounds", [])
    return {"mode": dp.get("mode"), "noise_multiplier": dp.get("noise_multiplier"),
            "sample_rate": dp.get("sample_rate"), "clip_norm": dp.get("clip_norm"),
            "adaptive": dp.get("adaptive"), "population": record.get("population"),
            "rounds": len(rounds), "sampled": [r["sampled"] for r in rounds],
            "clip_norms": [r["clip_norm"] for r in rounds]}


def add_empirical(report: dict[str, Any], dp: DPConfig, cfg: EmpiricalConfig,
                  scores: ReplicaScores) -> None:
    """Add the empirical tests' sections to ``report``, from the scores of a replica of
    ``dp`` sized by ``cfg``."""
    delta = dp.delta
    base_exposure = scores.before.exposures()
    members, others = len(scores.arms[0].members), len(scores.arms[0].non_members)
    provable = provable_bound(members, others, delta, cfg.confidence)
    rows: list[list[Any]] = []
    canary_rows: list[list[Any]] = []
    roc = Figure("Membership inference ROC (user level)",
                 "false positive rate", "true positive rate")
    summary: dict[str, Any] = {"membership_provable_bound": provable}
    for arm in scores.arms:
        exp = arm.secrets.exposures()
        auc, bound, fprs, tprs = membership_bound(arm.members, arm.non_members, delta,
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
            if arm.canaries is None:
                raise ValueError("the DP replica's scores have no canary clients")
            found["membership_can_reach_theory"] = provable >= theory
            found["canary"] = _canary_section(report, arm, arm.canaries, cfg, theory, delta)
            summary["replica"] = _replica_facts(arm)
            if bound > theory:
                flag(report, "empirical_epsilon_above_theory",
                     f"membership inference proves epsilon >= {bound:.3g} "
                     f"({100 * cfg.confidence:g} % confidence), above the theoretical "
                     f"{theory:.3g}")
        summary["dp" if private else "no_dp"] = found
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
        f"before training: {np.mean(base_exposure) if base_exposure else 0:.2f} bits). "
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
