"""The canary-client estimate's maths: epsilon between two Gaussians against a second
source, the estimate against the mechanism it estimates, and its false-alarm rate."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from dp_accounting.pld import privacy_loss_mechanism
from hypothesis import given, settings
from hypothesis import strategies as st

from covey.privacy import DPConfig, epsilon_spent
from covey.privacy._canaries import (
    alarm_threshold,
    canary_epsilon,
    cosines,
    gaussian_delta,
    gaussian_epsilon,
    ideal_estimates,
    unit_directions,
)

D = 49152  # the LoRA adapter's size, the dimension canaries live in


@pytest.mark.parametrize(("mu", "delta"), list(itertools.product(
    [0.05, 0.5, 1.0, 3.0, 8.0], [1e-7, 1e-5, 1e-2])))
def test_equal_spreads_give_the_gaussian_mechanism(mu: float, delta: float) -> None:
    # Google's dp_accounting computes the Gaussian mechanism's delta(epsilon) exactly.
    eps = gaussian_epsilon((mu, 1.0), (0.0, 1.0), delta)
    google = privacy_loss_mechanism.GaussianPrivacyLoss(1.0, sensitivity=mu)
    assert google.get_delta_for_epsilon(eps) == pytest.approx(delta, rel=1e-6)
    # only the distance in standard deviations counts
    assert gaussian_epsilon((2 * mu + 3, 2.0), (3.0, 2.0), delta) == pytest.approx(eps, rel=1e-6)


def _numeric_delta(eps: float, p: tuple[float, float], q: tuple[float, float]) -> float:
    """sup_S P(S) - e^eps Q(S) as the integral of (p - e^eps q)^+, by quadrature."""
    from scipy.integrate import quad
    from scipy.stats import norm

    def excess(x: float) -> float:
        return max(0.0, norm.pdf(x, *p) - math.exp(eps) * norm.pdf(x, *q))

    lo = min(p[0] - 40 * p[1], q[0] - 40 * q[1])
    hi = max(p[0] + 40 * p[1], q[0] + 40 * q[1])
    grid = np.linspace(lo, hi, 401)
    return sum(quad(excess, a, b, epsabs=1e-15, epsrel=1e-10, limit=200)[0]
               for a, b in itertools.pairwise(grid))


@pytest.mark.parametrize(("p", "q", "eps"), [
    ((1.0, 0.9), (0.0, 1.0), 1.0), ((1.0, 1.3), (0.0, 1.0), 2.0), ((0.0, 1.0), (1.0, 1.3), 2.0),
    ((0.0, 0.8), (0.0, 1.0), 0.3), ((0.0, 1.0), (0.0, 0.8), 0.3), ((4.0, 2.0), (0.0, 1.0), 5.0),
    ((-2.0, 1.1), (2.0, 1.1), 3.0),
])
def test_unequal_spreads_match_numerical_integration(p: tuple[float, float],
                                                     q: tuple[float, float], eps: float) -> None:
    assert gaussian_delta(eps, p, q) == pytest.approx(_numeric_delta(eps, p, q), rel=1e-6,
                                                      abs=1e-13)


@settings(max_examples=60, deadline=None)
@given(st.floats(0.0, 6.0), st.floats(0.5, 2.0), st.floats(0.5, 2.0),
       st.sampled_from([1e-6, 1e-4, 1e-2]))
def test_epsilon_is_symmetric_and_holds_its_delta(shift: float, s1: float, s0: float,
                                                  delta: float) -> None:
    p, q = (shift, s1), (0.0, s0)
    eps = gaussian_epsilon(p, q, delta)
    assert eps == pytest.approx(gaussian_epsilon(q, p, delta), rel=1e-9, abs=1e-9)
    assert max(gaussian_delta(eps, p, q), gaussian_delta(eps, q, p)) <= delta * (1 + 1e-6)
    if eps > 1e-3:  # the smallest such epsilon: a little less does not hold
        assert max(gaussian_delta(eps * 0.999, p, q), gaussian_delta(eps * 0.999, q, p)) > delta
    assert gaussian_epsilon((shift + 0.5, s1), q, delta) >= eps - 1e-9


def _ideal(rng: np.random.Generator, z: float, q: float, rounds: int, canaries: int,
           scale: float = 1.0) -> np.ndarray:
    """Canary cosines of the ideal mechanism (noise dominating the model delta): canary i
    is in n_i ~ Bin(T, q) rounds; its projection on the sum of the deltas is n_i C plus
    N(0, T (scale z C)^2), and the delta's norm is that of the noise, sqrt(T d) scale z C."""
    n = rng.binomial(rounds, q, canaries)
    return (n / (scale * z * math.sqrt(rounds)) + rng.standard_normal(canaries)) / math.sqrt(D)


def test_the_estimate_is_the_composed_gaussian_mechanism_when_every_canary_is_in() -> None:
    # Andrew et al.: asymptotically exact for the Gaussian mechanism. With q = 1, T rounds
    # at noise z are one Gaussian mechanism of sensitivity sqrt(T) / z.
    rng = np.random.default_rng(1)
    for z, rounds, delta in [(1.0, 8, 1e-5), (3.0, 4, 1e-5), (0.8, 2, 1e-2)]:
        found = canary_epsilon(_ideal(rng, z, 1.0, rounds, 40_000), D, delta)
        exact = gaussian_epsilon((math.sqrt(rounds) / z, 1.0), (0.0, 1.0), delta)
        assert found.mean == pytest.approx(math.sqrt(rounds) / z, abs=0.03)
        assert found.std == pytest.approx(1.0, abs=0.02)
        assert found.epsilon == pytest.approx(exact, rel=0.05)
        # and it sits below the accountant's bound for the same mechanism
        theory = epsilon_spent([DPConfig(noise_multiplier=z).segment(rounds)], delta)
        assert found.epsilon <= theory * 1.05


GRID = list(itertools.product([0.3, 1.0, 4.0], [1.0, 0.5, 0.1], [2, 8], [1e-5, 1e-2]))


def test_a_correct_mechanism_does_not_raise_the_alarm_and_a_tenth_of_its_noise_does() -> None:
    # The alarm's margin, measured on the ideal mechanism over a grid of runs with the
    # audit's 1,000 canaries (offline: 0 alarms in 21,600 audits over a wider grid).
    rng = np.random.default_rng(2)
    worst = 0.0
    for z, q, rounds, delta in GRID:
        theory = epsilon_spent([DPConfig(noise_multiplier=z, sample_rate=q).segment(rounds)],
                               delta)
        ideal = ideal_estimates(np.ones(rounds), np.full(rounds, z), q, 1000, D, delta,
                                audits=60, seed=len(GRID))
        threshold = alarm_threshold(theory, ideal)
        assert threshold >= 1.5 * theory + 1
        for _ in range(6):
            found = canary_epsilon(_ideal(rng, z, q, rounds, 1000), D, delta).epsilon
            worst = max(worst, found / threshold)
        broken = canary_epsilon(_ideal(rng, z, q, rounds, 1000, scale=0.1), D, delta)
        assert broken.epsilon > threshold, (z, q, rounds, delta)
    assert worst < 0.9, f"a correct mechanism came within {worst:.2f} of the alarm"


def test_sampling_can_lift_the_estimate_above_the_theory_and_the_alarm_allows_for_it() -> None:
    # Low noise, half the canaries in a round: the Gaussian fitted to canaries sampled 0
    # or 1 times overshoots the accountant's bound; the simulated audits see it.
    z, q, rounds, delta = 0.3, 0.5, 1, 1e-5
    theory = epsilon_spent([DPConfig(noise_multiplier=z, sample_rate=q).segment(rounds)],
                           delta)
    found = canary_epsilon(_ideal(np.random.default_rng(4), z, q, rounds, 1000), D, delta)
    assert found.epsilon > 1.5 * theory + 1  # a fixed margin over the theory would cry wolf
    ideal = ideal_estimates([1.0], [z], q, 1000, D, delta, audits=100)
    assert found.epsilon < alarm_threshold(theory, ideal)


def test_replace_one_compares_the_canary_with_its_opposite() -> None:
    # Local mode: the aggregator sees each pod's release u + N(0, (zC)^2); a canary's
    # T releases against its opposite's are a Gaussian mechanism of sensitivity
    # 2 sqrt(T) / z, as the accountant charges local mode (sensitivity 2C).
    rng = np.random.default_rng(3)
    z, rounds, delta, k, d = 2.0, 4, 1e-5, 2000, 4096
    directions = unit_directions(5, k, d)
    released = rounds * directions + rng.standard_normal((k, d)) * z * math.sqrt(rounds)
    found = canary_epsilon(cosines(directions, released), d, delta, replace_one=True)
    theory = epsilon_spent([DPConfig(mode="local", noise_multiplier=z).segment(rounds)], delta)
    assert found.epsilon == pytest.approx(theory, rel=0.15)
    silent = canary_epsilon(cosines(directions, rounds * directions), d, delta, replace_one=True)
    assert silent.epsilon == math.inf


def test_directions_are_unit_reproducible_and_the_null_is_one_over_d() -> None:
    first = unit_directions(7, 300, D)
    assert np.allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(first, unit_directions(7, 300, D))
    null = unit_directions(7, 300, D, stream=1)
    assert not np.array_equal(first, null)
    model = np.random.default_rng(0).standard_normal(D)  # any fixed vector
    scaled = cosines(null, model) * math.sqrt(D)
    assert abs(scaled.mean()) < 4 / math.sqrt(300) and scaled.std() == pytest.approx(1.0, abs=0.15)
    assert np.array_equal(cosines(first, np.zeros(D)), np.zeros(300))


def test_estimate_refuses_too_little_to_fit() -> None:
    with pytest.raises(ValueError):
        canary_epsilon(np.array([0.1]), D, 1e-5)
    with pytest.raises(ValueError):
        gaussian_epsilon((0.0, 1.0), (1.0, 1.0), 0.0)
