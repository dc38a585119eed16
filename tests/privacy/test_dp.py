"""The mechanisms as they run, checked against the epsilon they claim: each sensitivity is
measured on the code that releases, then accounted by Google's ``dp_accounting``."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting import dp_event, rdp
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from covey.aggregator._rounds import RunConfig, run_epsilon
from covey.privacy import (
    AdaptiveClipping,
    DPConfig,
    SecureNoise,
    SeededNoise,
    SeedRatchet,
    clip_update,
    poisson_sample,
)
from covey.privacy._accounting import RDP_ORDERS


class ZeroNoise:
    """No noise at all: lets a test read the statistic a mechanism releases."""

    private = True

    def normal(self, std: float, size: int) -> np.ndarray:
        return np.zeros(size)

    def describe(self) -> str:
        return "none"


def _google_epsilon(z: float, q: float, rounds: int, delta: float) -> float:
    acc = rdp.RdpAccountant(list(RDP_ORDERS))
    event = dp_event.GaussianDpEvent(z)
    acc.compose(event if q == 1 else dp_event.PoissonSampledDpEvent(q, event), rounds)
    return float(acc.get_epsilon(delta))


def _released_count(clipping: AdaptiveClipping, unclipped: int, participants: int,
                    expected: float) -> float:
    """The count statistic ``next_clip`` released, read back from the clip it returned:
    C' = C exp(-lr (b - target)) with b the released count over the expected pods."""
    new = clipping.next_clip(1.0, unclipped, participants, expected, ZeroNoise())
    estimate = clipping.target_quantile - math.log(new) / clipping.learning_rate
    return estimate * expected


def _count_sensitivity(clipping: AdaptiveClipping, expected: float, pods: int) -> float:
    """The most adding one user (clipped or not) moves the released count, over every
    data set of up to ``pods`` users."""
    worst = 0.0
    for n in range(pods):
        for k in range(n + 1):
            here = _released_count(clipping, k, n, expected)
            for bit in (0, 1):
                worst = max(worst, abs(_released_count(clipping, k + bit, n + 1, expected)
                                       - here))
    return worst


@pytest.mark.parametrize(("pods", "z", "q", "rounds"), [(20, 1.0, 1.0, 3), (50, 0.8, 0.2, 10)])
def test_adaptive_clipping_is_accounted_as_the_mechanism_that_runs(
        pods: int, z: float, q: float, rounds: int) -> None:
    # The review's case (20 pods, z = 1, 3 rounds) claimed 9.01 where the mechanism that
    # ran gave 12.68: the count released was uncentred (sensitivity 1, accounted as 1/2).
    clipping = AdaptiveClipping(target_quantile=0.5)
    dp = DPConfig(noise_multiplier=z, clip_norm=1.0, sample_rate=q, delta=1e-5,
                  adaptive=clipping)
    expected = q * pods
    sensitivity = _count_sensitivity(clipping, expected, pods)
    z_update = clipping.update_noise_multiplier(z, expected)
    update_sensitivity = float(np.linalg.norm(clip_update(np.full(64, 9.0), 1.0)[0]))
    # both releases see the same users: one Gaussian on the joint vector
    joint = ((update_sensitivity / (z_update * dp.clip_norm)) ** 2
             + (sensitivity / clipping.count_std(expected)) ** 2) ** -0.5
    true_epsilon = _google_epsilon(joint, q, rounds, dp.delta)
    claimed = run_epsilon(RunConfig(rounds=rounds, dp=dp), rounds)
    assert claimed >= true_epsilon * (1 - 1e-6)
    assert claimed == pytest.approx(true_epsilon, rel=1e-4)  # and not over-cautious


def test_one_local_release_is_charged_at_its_sensitivity() -> None:
    # The aggregator sees each pod's release in local mode. Two data sets of one user can
    # give clipped updates pointing opposite ways: 2C apart. The review's case: z = 1,
    # one release, 4.73 claimed, 10.73 true.
    dp = DPConfig(mode="local", noise_multiplier=1.0, clip_norm=1.0, delta=1e-5)
    direction = np.ones(64) / 8.0
    a, _ = clip_update(direction * 5, dp.clip_norm)
    b, _ = clip_update(-direction * 5, dp.clip_norm)
    sensitivity = float(np.linalg.norm(a - b))
    assert sensitivity == pytest.approx(2 * dp.clip_norm, rel=1e-6)
    true_epsilon = _google_epsilon(dp.noise_multiplier * dp.clip_norm / sensitivity, 1.0, 1,
                                   dp.delta)
    claimed = run_epsilon(RunConfig(rounds=1, dp=dp), 1)
    assert claimed == pytest.approx(true_epsilon, rel=1e-4)
    assert claimed == pytest.approx(10.73, abs=0.01)


def test_a_target_epsilon_solves_local_noise_for_its_sensitivity() -> None:
    local = DPConfig(mode="local", clip_norm=1.0, delta=1e-5).solved(8.0, 5)
    central = DPConfig(mode="central", clip_norm=1.0, delta=1e-5).solved(8.0, 5)
    assert local.noise_multiplier == pytest.approx(2 * central.noise_multiplier)
    assert run_epsilon(RunConfig(rounds=5, dp=local), 5) <= 8.0


# -- where the noise comes from --------------------------------------------------------

def test_secure_noise_is_standard_normal() -> None:
    draws = SecureNoise().normal(1.0, 200_000)
    # a correct sampler fails this 1 time in 10^6
    assert stats.kstest(draws, "norm").pvalue > 1e-6
    scaled = SecureNoise().normal(3.0, 200_000)
    assert float(scaled.std()) == pytest.approx(3.0, rel=0.01)  # sd of the sd: 0.16 %
    assert np.all(np.isfinite(scaled))


def test_secure_noise_is_fresh_and_seeded_noise_repeats() -> None:
    assert not np.array_equal(SecureNoise().normal(1.0, 64), SecureNoise().normal(1.0, 64))
    np.testing.assert_array_equal(SeededNoise(3).normal(1.0, 64),
                                  SeededNoise(3).normal(1.0, 64))
    assert SecureNoise.private and not SeededNoise.private


def test_a_resumed_ratchet_gives_the_same_future_seeds() -> None:
    ratchet = SeedRatchet.from_seed(4)
    ratchet.advance()
    resumed = SeedRatchet(ratchet.state)
    assert [ratchet.advance() for _ in range(3)] == [resumed.advance() for _ in range(3)]
    assert SeedRatchet().state != SeedRatchet().state


@given(st.floats(0.01, 0.99))
def test_poisson_sampling_keeps_each_node_at_the_rate(rate: float) -> None:
    nodes = list(range(1, 2001))
    counts = [len(poisson_sample(nodes, rate, bytes([i]) * 32)) for i in range(5)]
    mean, sd = rate * 2000, math.sqrt(2000 * rate * (1 - rate) / 5)
    assert abs(float(np.mean(counts)) - mean) < 6 * sd + 1  # 6 sd: 1 in 10^8 per example


def test_a_nodes_draw_does_not_depend_on_the_others() -> None:
    seed = bytes(range(32))
    alone = poisson_sample([5, 17, 99], 0.5, seed)
    among = poisson_sample(list(range(1, 200)), 0.5, seed)
    assert [n for n in among if n in (5, 17, 99)] == alone
    assert poisson_sample([1, 2, 3], 1.0, seed) == [1, 2, 3]
