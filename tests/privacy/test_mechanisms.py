"""DP mechanisms by name: each one's client and server step on fixed inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from covey.privacy import (
    MAX_NORM,
    MECHANISMS,
    USAGE_SENSITIVITY,
    DPConfig,
    SeededNoise,
    gaussian_release,
    local_norm_bound,
    mechanism,
)


@dataclass(frozen=True)
class _Update:
    values: np.ndarray
    examples: int = 0
    clipped: bool = False


def _f32(*values: float) -> np.ndarray:
    return np.array(values, np.float32)


def test_the_mechanism_is_looked_up_by_mode_and_none_when_not_private() -> None:
    assert sorted(MECHANISMS) == ["central", "local", "none"]
    assert mechanism(DPConfig("central")).name == "central"
    assert mechanism(DPConfig("local")).name == "local"
    assert mechanism(DPConfig("central", noise_multiplier=0.0)).name == "none"
    assert mechanism(DPConfig("local", clip_norm=math.inf)).name == "none"


def test_client_steps_clip_and_local_noises_with_z_times_c() -> None:
    delta = _f32(3.0, 4.0)  # norm 5
    for mode in ("central", "local"):
        dp = DPConfig(mode, noise_multiplier=0.5, clip_norm=1.0)
        released, norm = MECHANISMS[mode].client_step(delta, dp, SeededNoise(3))
        assert norm == 5.0
        expected = _f32(0.6, 0.8)
        if mode == "local":
            expected = (expected + SeededNoise(3).normal(0.5, 2)).astype(np.float32)
        np.testing.assert_array_equal(released, expected)
    plain = DPConfig(noise_multiplier=0.0, clip_norm=2.0)
    released, _ = MECHANISMS["none"].client_step(delta, plain, SeededNoise(3))
    np.testing.assert_allclose(released, [1.2, 1.6], rtol=1e-6)


def test_central_server_step_reclips_sums_noises_and_divides_by_expected_pods() -> None:
    dp = DPConfig("central", noise_multiplier=0.5, clip_norm=1.0)
    updates = [_Update(_f32(3.0, 4.0)), _Update(_f32(0.3, 0.4)),
               _Update(_f32(0.0, 0.5), clipped=True)]
    out = MECHANISMS["central"].server_step(updates, 2, dp, 4.0, SeededNoise(9), 0.5)
    total = np.array([0.6 + 0.3 + 0.0, 0.8 + 0.4 + 0.5]).astype(np.float32)
    noised = (total + SeededNoise(9).normal(0.5, 2)).astype(np.float32)
    np.testing.assert_allclose(out.mean, noised / 4.0, rtol=1e-6)
    assert out.unclipped == 1  # the pod that said it clipped is not counted
    assert out.noise_std == 0.5 / 4.0
    with pytest.raises(ValueError, match="expected number"):
        MECHANISMS["central"].server_step(updates, 2, dp, 0.0, None, 0.5)


def test_local_server_step_adds_nothing_and_bounds_norms() -> None:
    dp = DPConfig("local", noise_multiplier=2.0, clip_norm=1.0)
    updates = [_Update(_f32(1.0, -2.0)), _Update(_f32(3.0, 6.0))]
    out = MECHANISMS["local"].server_step(updates, 2, dp, 4.0, SeededNoise(9), 2.0)
    np.testing.assert_array_equal(out.mean, _f32(1.0, 1.0))
    assert (out.unclipped, out.noise_std) == (0, 2.0 * math.sqrt(2) / 4.0)
    assert MECHANISMS["local"].max_norm(dp, 10) == local_norm_bound(1.0, 2.0, 10)
    assert MECHANISMS["central"].max_norm(dp, 10) == MAX_NORM


def test_none_server_step_weights_by_examples() -> None:
    dp = DPConfig(noise_multiplier=0.0)
    updates = [_Update(_f32(1.0, 0.0), examples=1), _Update(_f32(0.0, 4.0), examples=3)]
    out = MECHANISMS["none"].server_step(updates, 2, dp, 1.0, None, 0.0)
    np.testing.assert_allclose(out.mean, [0.25, 3.0])
    assert (out.unclipped, out.noise_std) == (2, 0.0)
    empty = MECHANISMS["none"].server_step([], 2, dp, 1.0, None, 0.0)
    np.testing.assert_array_equal(empty.mean, _f32(0.0, 0.0))


def test_gaussian_release_noises_a_statistic_at_z_times_its_sensitivity() -> None:
    values = np.full(24, 1 / 24)
    out = gaussian_release(values, USAGE_SENSITIVITY, 1.5, SeededNoise(1))
    np.testing.assert_array_equal(out, values + SeededNoise(1).normal(1.5 * math.sqrt(2), 24))
    assert out.dtype == np.float64
