"""DP-FedAvg aggregation: plain FedAvg without DP, the sensitivity bound, bad updates."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from covey.aggregator._strategy import PodUpdate, aggregate, max_norm
from covey.privacy import DPConfig, SecureNoise, SeededNoise, clip_update

SIZE = 64
NO_DP = DPConfig(mode="central", noise_multiplier=0.0, clip_norm=float("inf"))


def _updates(rng: np.random.Generator, n: int, scale: float = 1.0) -> list[PodUpdate]:
    return [PodUpdate(i, (rng.normal(size=SIZE) * scale).astype(np.float32),
                      int(rng.integers(1, 50)), "v1") for i in range(n)]


def test_without_noise_and_clipping_one_round_is_plain_fedavg() -> None:
    rng = np.random.default_rng(0)
    updates = _updates(rng, 5, scale=10.0)
    ours = aggregate(updates, SIZE, "v1", NO_DP, expected_pods=5).delta
    # Flower's own FedAvg weighting on the same updates, as the reference
    records = [RecordDict({"a": ArrayRecord({"u": Array(u.values)}),
                           "m": MetricRecord({"num-examples": u.examples})}) for u in updates]
    reference = aggregate_arrayrecords(records, "num-examples")["u"].numpy()
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)


def test_one_pod_moves_the_private_average_by_at_most_c_over_qn() -> None:
    rng = np.random.default_rng(1)
    dp = DPConfig(mode="central", noise_multiplier=1e-12, clip_norm=0.5, sample_rate=0.5)
    others = _updates(rng, 9, scale=3.0)
    outlier = PodUpdate(99, np.full(SIZE, 1e3, np.float32), 1000, "v1")
    expected_pods = dp.sample_rate * 20
    with_pod = aggregate([*others, outlier], SIZE, "v1", dp, expected_pods,
                         SeededNoise(1)).delta
    without = aggregate(others, SIZE, "v1", dp, expected_pods, SeededNoise(1)).delta
    moved = float(np.linalg.norm(with_pod - without))
    assert moved <= dp.clip_norm / expected_pods * (1 + 1e-4)
    assert moved > 0.9 * dp.clip_norm / expected_pods  # the bound is what it costs


def test_central_noise_has_the_stated_standard_deviation() -> None:
    dp = DPConfig(mode="central", noise_multiplier=1.3, clip_norm=2.0, sample_rate=1.0)
    zeros = [PodUpdate(i, np.zeros(50_000, np.float32), 1, "v1") for i in range(4)]
    result = aggregate(zeros, 50_000, "v1", dp, expected_pods=4.0, noise=SecureNoise())
    assert result.noise_std == pytest.approx(1.3 * 2.0 / 4.0)
    assert float(result.delta.std()) == pytest.approx(result.noise_std, rel=0.02)


def test_local_mode_adds_no_server_noise() -> None:
    dp = DPConfig(mode="local", noise_multiplier=1.0, clip_norm=1.0)
    ones = [PodUpdate(i, np.ones(SIZE, np.float32), 1, "v1") for i in range(4)]
    result = aggregate(ones, SIZE, "v1", dp, expected_pods=4.0)
    np.testing.assert_allclose(result.delta, np.ones(SIZE))


@pytest.mark.parametrize(("values", "version", "examples", "reason"), [
    (np.full(SIZE, np.nan, np.float32), "v1", 3, "non_finite"),
    (np.full(SIZE, np.inf, np.float32), "v1", 3, "non_finite"),
    (np.zeros(SIZE + 1, np.float32), "v1", 3, "wrong_shape"),
    (np.zeros(SIZE, np.float64), "v1", 3, "wrong_shape"),
    (np.zeros((8, 8), np.float32), "v1", 3, "wrong_shape"),
    (np.zeros(SIZE, np.float32), "v0", 3, "wrong_version"),
    (np.zeros(SIZE, np.float32), "v1", -1, "malformed"),
])
def test_bad_updates_are_rejected_and_counted(values: np.ndarray, version: str,
                                               examples: int, reason: str) -> None:
    rng = np.random.default_rng(3)
    good = _updates(rng, 3)
    dp = DPConfig(mode="central", noise_multiplier=0.5, clip_norm=1.0)
    result = aggregate([*good, PodUpdate(7, values, examples, version)], SIZE, "v1", dp,
                       expected_pods=4.0)
    assert result.accepted == 3
    assert result.rejected == {reason: 1}
    assert np.all(np.isfinite(result.delta))


def test_unclipped_count_uses_the_pods_own_clipping_flag() -> None:
    dp = DPConfig(mode="central", noise_multiplier=1.0, clip_norm=1.0)
    small = np.full(SIZE, 0.01, np.float32)
    updates = [PodUpdate(0, small, 1, "v1", clipped=True),  # clipped on the pod
               PodUpdate(1, small, 1, "v1", clipped=False),
               PodUpdate(2, small * 1000, 1, "v1", clipped=False)]  # over C on the server
    assert aggregate(updates, SIZE, "v1", dp, expected_pods=3.0).unclipped == 1


def test_without_dp_an_update_without_examples_is_malformed() -> None:
    empty = PodUpdate(1, np.zeros(SIZE, np.float32), 0, "v1")
    result = aggregate([empty], SIZE, "v1", NO_DP, expected_pods=1.0)
    assert result.rejected == {"malformed": 1}


def test_a_rogue_local_update_is_bounded_by_what_an_honest_one_reaches() -> None:
    # An attacker's pod sends one huge update in local mode, where the aggregator cannot
    # re-clip (it would bias the noised updates). It may move the average no further
    # than an honest clipped-and-noised update could (with probability 1 - 1e-12).
    d = 49_152  # the built-in model's adapter
    dp = DPConfig(mode="local", noise_multiplier=1.0, clip_norm=1.0)
    noise = SeededNoise(7)
    honest = []
    for i in range(200):
        direction = noise.normal(1.0, d).astype(np.float32)
        clipped, _ = clip_update(direction, dp.clip_norm)
        honest.append(PodUpdate(i, clipped + noise.normal(1.0, d).astype(np.float32), 0,
                                "v1"))
    rogue = PodUpdate(999, np.full(d, 1e5 / np.sqrt(d), np.float32), 0, "v1")  # norm 1e5
    result = aggregate([*honest, rogue], d, "v1", dp, expected_pods=200.0)
    assert result.accepted == 200 and result.rejected == {"too_large": 1}
    # the bound is not slack: sqrt(d) is most of it, as the norm of the noise itself
    honest_norms = [float(np.linalg.norm(u.values)) for u in honest]
    assert max(honest_norms) < max_norm(dp, d) < 1.05 * max(honest_norms)
