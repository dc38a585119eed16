"""Accountants against Google's dp_accounting, the noise solver, and the DP mechanisms."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting import dp_event, pld, rdp
from hypothesis import given, settings
from hypothesis import strategies as st

from covey.privacy import (
    AdaptiveClipping,
    DPConfig,
    GaussianRounds,
    add_gaussian_noise,
    clip_update,
    epsilon_spent,
    get_accountant,
    noise_for_epsilon,
)
from covey.privacy._accounting import RDP_ORDERS


def _event(seg: GaussianRounds) -> dp_event.DpEvent:
    gaussian = dp_event.GaussianDpEvent(seg.noise_multiplier)
    if seg.sample_rate == 1.0:
        return gaussian
    return dp_event.PoissonSampledDpEvent(seg.sample_rate, gaussian)


def _google_rdp(history: list[GaussianRounds], delta: float) -> float:
    acc = rdp.RdpAccountant(list(RDP_ORDERS))
    for seg in history:
        acc.compose(_event(seg), seg.rounds)
    return float(acc.get_epsilon(delta))


def _google_pld(history: list[GaussianRounds], delta: float) -> float:
    acc = pld.PLDAccountant(value_discretization_interval=1e-4)
    for seg in history:
        acc.compose(_event(seg), seg.rounds)
    return float(acc.get_epsilon(delta))


HISTORIES = [
    [GaussianRounds(1.1, 0.01, 1000)],
    [GaussianRounds(0.8, 1.0, 5)],
    [GaussianRounds(2.0, 0.3, 20)],
    [GaussianRounds(1.0, 0.1, 50), GaussianRounds(3.0, 1.0, 4)],
    [GaussianRounds(5.0, 0.5, 3)],
]


@pytest.mark.parametrize("history", HISTORIES)
def test_rdp_matches_dp_accounting(history: list[GaussianRounds]) -> None:
    ours = epsilon_spent(history, 1e-5, "rdp")
    assert ours == pytest.approx(_google_rdp(history, 1e-5), rel=1e-6)


@pytest.mark.parametrize("history", HISTORIES)
def test_prv_matches_pld_and_is_tighter_than_rdp(history: list[GaussianRounds]) -> None:
    ours = epsilon_spent(history, 1e-5, "prv")
    reference = _google_pld(history, 1e-5)
    # PRV reports the upper end of an interval of width ~eps_error around the estimate.
    assert reference - 0.02 <= ours <= reference + 0.05
    assert ours <= epsilon_spent(history, 1e-5, "rdp") + 0.02


def _analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """The exact epsilon of one Gaussian release (Balle & Wang 2018, Theorem 8)."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    def excess(eps: float) -> float:
        return (norm.cdf(0.5 / sigma - eps * sigma)
                - math.exp(eps) * norm.cdf(-0.5 / sigma - eps * sigma) - delta)

    return float(brentq(excess, 0.0, 100.0))


@pytest.mark.parametrize("sigma", [0.7, 1.0, 2.0])
def test_pure_gaussian_known_value(sigma: float) -> None:
    exact = _analytic_gaussian_epsilon(sigma, 1e-5)
    history = [GaussianRounds(sigma, 1.0, 1)]
    assert exact <= epsilon_spent(history, 1e-5, "prv") <= exact + 0.05
    assert exact < epsilon_spent(history, 1e-5, "rdp") < exact * 1.2


def test_no_rounds_spend_nothing_and_bad_input_is_refused() -> None:
    assert epsilon_spent([GaussianRounds(1.0, 0.5, 0)], 1e-5) == 0.0
    with pytest.raises(ValueError, match="sample rate"):
        GaussianRounds(1.0, 0.0, 1)
    with pytest.raises(ValueError, match="noise multiplier"):
        GaussianRounds(0.0, 0.5, 1)
    with pytest.raises(ValueError, match="delta"):
        epsilon_spent([GaussianRounds(1.0, 0.5, 1)], 0.0)
    with pytest.raises(ValueError, match="unknown accountant"):
        get_accountant("moments")


@settings(max_examples=15, deadline=None)
@given(target=st.floats(0.3, 30.0), q=st.floats(0.01, 1.0), rounds=st.integers(1, 200))
def test_solver_never_overshoots(target: float, q: float, rounds: int) -> None:
    z = noise_for_epsilon(target, 1e-5, q, rounds)
    spent = epsilon_spent([GaussianRounds(z, q, rounds)], 1e-5)
    assert spent <= target
    # and it is not wastefully large: 1 % less noise would overshoot (or z is at its floor)
    smaller = z * 0.99
    assert epsilon_spent([GaussianRounds(smaller, q, rounds)], 1e-5) > target or z < 0.02


def test_solver_with_prv_meets_target() -> None:
    z = noise_for_epsilon(2.0, 1e-5, 0.2, 10, accountant="prv", tolerance=1e-2)
    assert epsilon_spent([GaussianRounds(z, 0.2, 10)], 1e-5, "prv") <= 2.0


def test_solver_refuses_an_unreachable_target() -> None:
    with pytest.raises(ValueError, match="no noise multiplier"):
        noise_for_epsilon(1e-6, 1e-9, 1.0, 100_000)
    with pytest.raises(ValueError, match="positive"):
        noise_for_epsilon(0.0, 1e-5, 1.0, 1)


def test_adaptive_clipping_costs_exactly_its_share() -> None:
    # RDP of a Gaussian is alpha / (2 z^2); the update and the count compose to z.
    z, pods = 1.2, 40.0
    clipping = AdaptiveClipping()
    z_update = clipping.update_noise_multiplier(z, pods)
    sigma_b = clipping.count_std(pods)
    assert z_update ** -2 + (2 * sigma_b) ** -2 == pytest.approx(z ** -2)
    assert z_update > z
    with pytest.raises(ValueError, match="too small"):
        AdaptiveClipping(count_noise=0.1).update_noise_multiplier(1.0, pods)


def test_adaptive_clip_moves_toward_the_quantile() -> None:
    clipping = AdaptiveClipping(target_quantile=0.5, count_noise=1e-9)
    # every update unclipped: the clip norm shrinks; none unclipped: it grows
    assert clipping.next_clip(1.0, 20, 20, 20.0) < 1.0
    assert clipping.next_clip(1.0, 0, 20, 20.0) > 1.0
    # half of them: the quantile is reached, the clip norm stays
    assert clipping.next_clip(1.0, 10, 20, 20.0) == pytest.approx(1.0, abs=1e-6)


def test_clip_and_noise() -> None:
    rng = np.random.default_rng(1)
    update = rng.normal(size=10_000).astype(np.float32)
    clipped, norm = clip_update(update, 1.0)
    assert norm == pytest.approx(float(np.linalg.norm(update)))
    assert float(np.linalg.norm(clipped)) == pytest.approx(1.0, rel=1e-5)
    small, _ = clip_update(update * 1e-4, 1.0)
    np.testing.assert_allclose(small, update * 1e-4, rtol=1e-6)
    unclipped, _ = clip_update(update, math.inf)
    np.testing.assert_array_equal(unclipped, update)
    noised = add_gaussian_noise(np.zeros(100_000, np.float32), 0.5)
    assert float(noised.std()) == pytest.approx(0.5, rel=0.02)
    with pytest.raises(ValueError, match="non-finite"):
        clip_update(np.array([np.nan], np.float32), 1.0)


def test_dp_config_states_its_mechanism() -> None:
    central = DPConfig(mode="central", noise_multiplier=1.0, sample_rate=0.1)
    assert central.amplified_rate == 0.1
    assert "amplification" in str(central.statement()["sampling"])
    local = DPConfig(mode="local", noise_multiplier=1.0, sample_rate=0.1)
    assert local.amplified_rate == 1.0  # a pod cannot verify the aggregator's sampling
    assert "no sampling amplification" in str(local.statement()["sampling"])
    assert DPConfig(noise_multiplier=0.0).statement()["guarantee"] == "none"
    with pytest.raises(ValueError, match="central"):
        DPConfig(mode="local", adaptive=AdaptiveClipping())
    with pytest.raises(ValueError, match="mode"):
        DPConfig(mode="distributed")  # type: ignore[arg-type]
