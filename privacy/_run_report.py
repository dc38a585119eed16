"""The run report (``covey audit --run DIR``), for real and simulated runs alike.

Rendered from a :class:`RunAudit`: a run record (``runs/<id>.json``, the same format for
``covey train`` and ``covey simulate``) and the versions the run released. It states the
mechanism and its assumptions, epsilon against rounds at the run's delta, an independent
recomputation by the other accountant and the noise the released versions hold; the
empirical tests of :mod:`covey.privacy._empirical` can be added to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from covey.privacy._accounting import epsilon_spent
from covey.privacy._dp import AdaptiveClipping, DPConfig
from covey.privacy._report import Figure, flag, new_report, section, table

__all__ = ["AGREEMENT", "RunAudit", "noise_norm_floor", "run_report"]

AGREEMENT = 0.05  # accountants agreeing within 5 % need no explanation

#: The released-noise check flags a correct run with at most this probability.
RELEASED_NOISE_TAIL = 1e-9


@dataclass(frozen=True)
class RunAudit:
    """The facts of a training run that its report is rendered from.

    Raises (on construction) ValueError, KeyError or TypeError when the record does not
    state a readable mechanism.
    """

    record: dict[str, Any]  # the run record, as written
    path: Path  # where the record is
    # Each released round's stats and delta (the version minus its parent); None when
    # the run's registry is not there.
    released: list[tuple[dict[str, Any], np.ndarray]] | None = None

    def __post_init__(self) -> None:
        _dp(self.record)

    @property
    def dp(self) -> DPConfig:
        """The run's mechanism as its record states it."""
        return _dp(self.record)


def _dp(record: dict[str, Any]) -> DPConfig:
    """The run's mechanism as its record states it, adaptive clipping included."""
    stated = dict(record["config"]["dp"])
    adaptive = stated.pop("adaptive", None)
    return DPConfig(**stated, adaptive=AdaptiveClipping(**adaptive) if adaptive else None)


def _mechanism(record: dict[str, Any], report: dict[str, Any]) -> None:
    statement = dict(record.get("mechanism") or _dp(record).statement())
    assumptions = statement.pop("assumptions", [])
    sec = section(report, "mechanism", "Mechanism and assumptions")
    table(sec, ["property", "value"], [[k, str(v)] for k, v in statement.items()])
    sec["notes"].extend(f"Assumption: {a}." for a in assumptions)
    sim = record.get("simulation")
    where = (f"a simulation of {sim['population']['users']} pods ({sim['engine']} engine)"
             if sim else f"a federated run over {record.get('population', '?')} connected pods")
    sec["notes"].insert(0, f"Run {record['run_id']}: {where}, {len(record['rounds'])} of "
                           f"{record['config']['rounds']} rounds, status {record['status']}.")


def _epsilons(record: dict[str, Any], report: dict[str, Any]) -> None:
    dp = _dp(record)
    rounds = record["rounds"]
    primary = dp.accountant
    other = "prv" if primary == "rdp" else "rdp"
    target = record["config"].get("target_epsilon")
    sec = section(report, "epsilon", "Epsilon against rounds")
    if not dp.private:
        sec["notes"].append("The run was not differentially private: no epsilon bounds what "
                            "it reveals about a user.")
        flag(report, "non_private_release", f"run {record['run_id']} trained without DP "
                                            "(guarantee: none)")
        report["summary"].update(epsilon=None, delta=dp.delta)
        return
    xs = list(range(1, len(rounds) + 1))
    curves = {name: [epsilon_spent([dp.segment(r)], dp.delta, name) for r in xs]
              for name in (primary, other)}
    figure = Figure(f"Epsilon after each round (delta {dp.delta:.3g})", "round", "epsilon")
    figure.line(f"{primary.upper()} (the run's accountant)", xs, curves[primary])
    figure.line(f"{other.upper()} (independent check)", xs, curves[other])
    figure.line("recorded in the run", xs, [r.get("epsilon") for r in rounds])
    if target:
        figure.guide(f"target {target:g}", float(target))
    sec["figures"].append(figure.to_dict())
    table(sec, ["round", "sampled", "accepted", "refused", "rejected", "epsilon recorded",
                f"epsilon {primary}", f"epsilon {other}"],
          [[r["round"], r["sampled"], r["accepted"], sum(r.get("refused", {}).values()),
            sum(r.get("rejected", {}).values()), r.get("epsilon"), curves[primary][i],
            curves[other][i]] for i, r in enumerate(rounds)])
    final, check = (curves[primary][-1], curves[other][-1]) if xs else (0.0, 0.0)
    planned = epsilon_spent([dp.segment(int(record["config"]["rounds"]))], dp.delta, primary)
    relative = abs(final - check) / max(final, check) if max(final, check) > 0 else 0.0
    acc = section(report, "accountants", "Independent recomputation")
    if relative <= AGREEMENT:
        verdict = f"agree within {100 * relative:.1f} % (tolerance {100 * AGREEMENT:.0f} %)"
    elif final >= check:
        verdict = (f"differ by {100 * relative:.1f} %, explained: the run reports the larger "
                   f"value. {primary.upper()}'s conversion from Renyi DP to (epsilon, delta) "
                   "is a bound known to be loose; the PRV accountant bounds the privacy loss "
                   "distribution numerically and is tighter, so the reported epsilon is "
                   "conservative" if primary == "rdp" else
                   f"differ by {100 * relative:.1f} %, explained: the run reports the larger, "
                   "conservative value")
    else:
        verdict = (f"disagree by {100 * relative:.1f} %: the run's accountant reports less "
                   "than the independent one")
        flag(report, "accountants_disagree", f"{primary} reports epsilon {final:.3g} but "
                                             f"{other} gives {check:.3g}")
    table(acc, ["accountant", "role", "epsilon after the rounds run"],
          [[primary, "the run's", final], [other, "independent check", check]])
    acc["notes"].append(f"Both compose {len(rounds)} rounds of the sampled Gaussian "
                        f"mechanism (noise {dp.accounted_noise_multiplier:.4g} times the "
                        f"sensitivity, sampling rate {dp.amplified_rate:g}) at delta "
                        f"{dp.delta:.3g}; they {verdict}.")
    recorded = record.get("epsilon")
    if recorded is not None and not math.isclose(recorded, planned, rel_tol=1e-6):
        acc["notes"].append(f"The record states epsilon {recorded:.4g}; recomputed from its "
                            f"mechanism for all planned rounds: {planned:.4g}.")
    if target and final > float(target) * (1 + 1e-9):
        flag(report, "epsilon_over_target", f"epsilon {final:.3g} after {len(rounds)} "
                                            f"rounds is over the run's target {target:g}")
    report["summary"].update(epsilon=final, epsilon_check=check, delta=dp.delta,
                             accountant=primary, target_epsilon=target)


def _randomness(record: dict[str, Any], report: dict[str, Any]) -> None:
    """Where the run's noise came from, and whether a reader of its files can remove it."""
    if not _dp(record).private:
        return
    sec = section(report, "randomness", "Where the noise came from")
    randomness = record.get("randomness")
    checkpoint = record.get("checkpoint") or {}
    if "rng" in checkpoint:
        flag(report, "noise_recoverable", "the record holds the state of the generator that "
             "drew the noise; stepping it back regenerates every round's noise, so the "
             "published versions reveal the exact sum of clipped updates")
    if not isinstance(randomness, dict):
        flag(report, "noise_source_unstated", "the record does not say where its noise came "
             "from (written by a covey that drew noise from a stored generator)")
        return
    table(sec, ["property", "value"], [[k, str(v)] for k, v in randomness.items()])
    if not randomness.get("private", False):
        flag(report, "noise_reproducible", f"the noise derives from seed "
             f"{randomness.get('seed')}: whoever knows it can remove the noise, so this "
             "reproducible run gives no privacy guarantee")


def noise_norm_floor(size: int, tail: float) -> float:
    """The norm a standard normal vector of ``size`` coordinates reaches, except with
    probability ``tail``.

    Its norm is 1-Lipschitz, so P(|X| <= E|X| - u) <= exp(-u^2 / 2) (Gaussian
    concentration, Boucheron, Lugosi, Massart 2013, Theorem 5.6), and
    E|X| >= d / sqrt(d + 1); u = sqrt(2 ln(1 / tail)).
    """
    if not 0 < tail < 1 or size < 1:
        raise ValueError("tail must be in (0, 1) and size at least 1")
    return size / math.sqrt(size + 1) - math.sqrt(2 * math.log(1 / tail))


def _released_noise(run: RunAudit, report: dict[str, Any]) -> None:
    """Whether each version the run released carries the noise its mechanism claims.

    Round t releases (S_t + N_t) / E: S_t the sum of n_t updates clipped to C_t, so
    |S_t| <= n_t C_t, N_t the noise (std s_t per coordinate: z C_t on the sum, z
    shared with adaptive clipping; local mode sqrt(n_t) z C_t), E = q N. Then |N_t| <=
    E |delta_t| + n_t C_t, while a correct mechanism's |N_t| >= s_t * floor
    (:func:`noise_norm_floor`, all rounds together failing with probability at most
    ``RELEASED_NOISE_TAIL``). A release below that holds less noise than claimed.
    """
    dp, record, released = run.dp, run.record, run.released
    if not dp.private or not record["rounds"]:
        return
    sec = section(report, "released-noise", "Noise in the released versions")
    if not released:
        sec["notes"].append("The run's registry (beside runs/) is not there or holds no "
                            "release of this run: the released noise was not checked.")
        return
    expected = dp.sample_rate * int(record.get("population") or 0)
    if expected <= 0:
        return
    z = dp.noise_multiplier
    if dp.adaptive is not None:
        z = dp.adaptive.update_noise_multiplier(z, expected)
    size = len(released[0][1])
    floor = noise_norm_floor(size, RELEASED_NOISE_TAIL / len(released))
    rows, short = [], []
    for stats, delta in released:
        n, clip = int(stats["accepted"]), float(stats["clip_norm"])
        std = z * clip * (math.sqrt(n) if dp.mode == "local" else 1.0)
        # the most noise this release can hold, in units of the claimed noise's norm
        ratio = (expected * float(np.linalg.norm(delta)) + n * clip) / (std * math.sqrt(size))
        rows.append([stats["round"], n, std, ratio])
        if ratio * math.sqrt(size) < floor:
            short.append((stats["round"], ratio))
    need = floor / math.sqrt(size)
    table(sec, ["round", "updates", "claimed noise std on the sum",
                "most noise the release can hold / claimed"], rows)
    sec["notes"].append(
        f"A release holds at most (q N |delta| + n C) of noise, q N = {expected:.4g}; the "
        f"claimed noise has norm at least {need:.3f} times its expectation in all "
        f"{len(released)} rounds except with probability {RELEASED_NOISE_TAIL:g}. Less "
        "than that: the run released less noise than its mechanism claims. The check sees "
        "what was published, so it catches a broken run, not only broken code; it cannot "
        "see a shortfall hidden by n C, when a round's updates outweigh the noise.")
    if short:
        worst = min(short, key=lambda item: item[1])
        flag(report, "released_noise_below_claim",
             f"{len(short)} of {len(released)} released versions hold less noise than the "
             f"mechanism claims (round {worst[0]}: at most {worst[1]:.3g} of it)")


def _utility(record: dict[str, Any], report: dict[str, Any]) -> None:
    rounds = [r for r in record["rounds"] if "perplexity" in r]
    if not rounds:
        return
    sec = section(report, "utility", "Utility of the versions the run made")
    figure = Figure("Perplexity of each round's version", "round", "perplexity")
    figure.line("evaluated version", [r["round"] for r in rounds],
                [r["perplexity"] for r in rounds])
    sec["figures"].append(figure.to_dict())
    rolled = sum(1 for r in rounds if "rolled_back_to" in r)
    sec["notes"].append(f"{rolled} of {len(rounds)} versions were rolled back (quality "
                        "dropped more than 10 % below the best).")


def run_report(run: RunAudit) -> dict[str, Any]:
    """The report of a run, from its facts."""
    record = run.record
    report = new_report("run", f"Privacy audit of run {record['run_id']}")
    report["summary"] = {"run_id": record["run_id"], "record": str(run.path)}
    _mechanism(record, report)
    _epsilons(record, report)
    _randomness(record, report)
    _released_noise(run, report)
    _utility(record, report)
    return report
