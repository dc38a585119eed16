"""The run report (``covey audit --run DIR``), for real and simulated runs alike.

Built from a run record (``runs/<id>.json``, the same format for ``covey train`` and
``covey simulate``): the mechanism and its assumptions, epsilon against rounds at the
run's delta, an independent recomputation by the other accountant, and optionally the
empirical tests of :mod:`covey.privacy._empirical`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from covey.errors import InvalidInputError
from covey.privacy._accounting import epsilon_spent
from covey.privacy._dp import DPConfig
from covey.privacy._report import Figure, flag, new_report, section, table

__all__ = ["AGREEMENT", "find_record", "run_report"]

AGREEMENT = 0.05  # accountants agreeing within 5 % need no explanation

Progress = Callable[[str, int, int], None]


def find_record(path: Path) -> Path:
    """The run record at ``path``: the file itself, or the newest ``runs/*.json`` in it.

    Raises:
        InvalidInputError: nothing that looks like a run record there.
    """
    if path.is_file():
        return path
    folder = path / "runs" if (path / "runs").is_dir() else path
    records = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime) \
        if folder.is_dir() else []
    if not records:
        raise InvalidInputError(f"no run record (runs/*.json) in {path}")
    return records[-1]


def _load(path: Path) -> dict[str, Any]:
    try:
        record: dict[str, Any] = json.loads(path.read_text())
        _dp(record)  # the mechanism must be readable
        return record
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidInputError(f"{path} is not a readable run record ({exc})") from None


def _dp(record: dict[str, Any]) -> DPConfig:
    return DPConfig(**{k: v for k, v in record["config"]["dp"].items() if k != "adaptive"})


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


def run_report(path: Path, empirical: bool = False, progress: Progress | None = None,
               canary_config: Any = None) -> dict[str, Any]:
    """The report of the run record at ``path`` (a file, or a folder holding ``runs/``)."""
    record_path = find_record(path)
    record = _load(record_path)
    report = new_report("run", f"Privacy audit of run {record['run_id']}")
    report["summary"] = {"run_id": record["run_id"], "record": str(record_path)}
    _mechanism(record, report)
    _epsilons(record, report)
    _randomness(record, report)
    _utility(record, report)
    if empirical:
        from covey.privacy._empirical import EmpiricalConfig, add_empirical

        add_empirical(report, _dp(record), canary_config or EmpiricalConfig(), progress)
    return report
