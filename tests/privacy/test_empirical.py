"""The audit's empirical tests catch a broken mechanism, and the replica runs the run's own.

A broken mechanism is fed to the audit through the seam a run's noise comes through (a
noise source that adds less than the configuration claims: see ``broken_noise``), the
way a broken build would be; the audit must raise its red flag. A correct one must not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from covey.privacy import AdaptiveClipping, EmpiricalConfig
from covey.privacy._empirical import provable_bound
from covey.privacy._report import check_schema
from covey.simulations._replica import audit_run
from tests.privacy.broken_noise import ScaledNoise, SilentNoise

pytestmark = pytest.mark.slow

#: A small replica: the canary clients, not the members, do the detecting.
SMALL = EmpiricalConfig(members=4, non_members=8, secret_holders=1, repeats=16, rounds=4,
                        local_epochs=1, candidates=50, reference=False)


def _simulate(out: Path, **settings: Any) -> Path:
    from covey.simulations._config import SimulationConfig
    from covey.simulations._simulate import simulate

    simulate(SimulationConfig(pods=6, rounds=2, eval_examples=20, **settings), out)
    return out


@pytest.fixture(scope="module")
def central_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _simulate(tmp_path_factory.mktemp("central"), clients_per_round=3,
                     target_epsilon=4.0)


def _flags(report: dict[str, Any]) -> list[str]:
    return [f["code"] for f in report["red_flags"]]


def test_a_mechanism_that_claims_noise_and_adds_none_is_flagged(central_run: Path) -> None:
    report = audit_run(central_run, empirical=True, config=SMALL,
                       noise=SilentNoise())
    check_schema(report)
    canary = report["summary"]["empirical"]["dp"]["canary"]
    assert "canary_epsilon_above_theory" in _flags(report), canary
    theory = report["summary"]["empirical"]["dp"]["epsilon_theory"]
    assert canary["epsilon"] is None or canary["epsilon"] > 1.5 * theory + 1


def test_noise_at_a_tenth_of_the_claim_is_flagged(central_run: Path) -> None:
    report = audit_run(central_run, empirical=True, config=SMALL,
                       noise=ScaledNoise(0.1))
    canary = report["summary"]["empirical"]["dp"]["canary"]
    assert "canary_epsilon_above_theory" in _flags(report), canary
    # the replica's own record says it ran the run's sampling: q = 3 / 6
    assert report["summary"]["empirical"]["replica"]["sample_rate"] == 0.5


def test_the_replica_runs_the_runs_sampling_and_adaptive_clipping(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    adaptive = AdaptiveClipping(target_quantile=0.5, learning_rate=0.3, count_noise=2.0)
    run = _simulate(tmp_path_factory.mktemp("adaptive"), clients_per_round=1,
                    sample_rate=0.25, noise_multiplier=1.5, clip_norm=0.5, adaptive=adaptive)
    report = audit_run(run, empirical=True, config=SMALL)
    check_schema(report)
    replica = report["summary"]["empirical"]["replica"]
    assert replica["sample_rate"] == 0.25 and replica["noise_multiplier"] == 1.5
    assert replica["adaptive"] == {"target_quantile": 0.5, "learning_rate": 0.3,
                                   "count_noise": 2.0}
    clips = replica["clip_norms"]
    assert clips[0] == 0.5 and len(set(clips)) == SMALL.rounds  # C moved every round
    population = replica["population"]  # members and canary clients, sampled at q
    assert population == SMALL.members + SMALL.canary_clients
    assert all(abs(s - 0.25 * population) < 6 * (0.25 * 0.75 * population) ** 0.5
               for s in replica["sampled"])
    # A correct mechanism: no red flag; the report says how far each test can reach.
    assert report["red_flags"] == [], report["red_flags"]
    found = report["summary"]["empirical"]
    assert found["membership_provable_bound"] == pytest.approx(
        provable_bound(SMALL.members, SMALL.non_members, report["summary"]["delta"]))
    assert found["dp"]["membership_can_reach_theory"] is False
    notes = " ".join(n for s in report["sections"] for n in s["notes"])
    assert f"would prove epsilon >= {found['membership_provable_bound']:.3g} at most" in notes
    assert "it cannot prove a violation" in notes
    canary = found["dp"]["canary"]
    assert canary["epsilon"] is not None and canary["epsilon"] < canary["threshold"]


def test_local_mode_canaries_are_judged_by_what_the_aggregator_saw(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    run = _simulate(tmp_path_factory.mktemp("local"), clients_per_round=6, mode="local",
                    noise_multiplier=4.0)
    report = audit_run(run, empirical=True, config=SMALL, noise=SilentNoise())
    assert report["summary"]["empirical"]["replica"]["mode"] == "local"
    assert "canary_epsilon_above_theory" in _flags(report)
    assert report["summary"]["empirical"]["dp"]["canary"]["epsilon"] is None  # infinite
