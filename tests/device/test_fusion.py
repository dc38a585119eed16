"""Rank fusion and time decay: known values, argument checks and Hypothesis properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from covey.device.memory._fusion import fuse_with_decay, reciprocal_rank_fusion, time_decay

DAY = 86_400.0

ids = st.integers(min_value=0, max_value=50)
ranking = st.lists(ids, max_size=12, unique=True)
rankings = st.lists(ranking, min_size=1, max_size=4)


def test_rrf_known_values() -> None:
    fused = reciprocal_rank_fusion([[1, 2, 3], [3, 1]], k=60)
    assert fused == [
        (1, pytest.approx(1 / 61 + 1 / 62)),
        (3, pytest.approx(1 / 63 + 1 / 61)),
        (2, pytest.approx(1 / 62)),
    ]


def test_rrf_weights_and_ties() -> None:
    # 5 and 7 tie: each is first in one ranking of equal weight; the lower id wins.
    assert [i for i, _ in reciprocal_rank_fusion([[7], [5]])] == [5, 7]
    weighted = reciprocal_rank_fusion([[7], [5]], weights=[2.0, 1.0])
    assert weighted == [(7, pytest.approx(2 / 61)), (5, pytest.approx(1 / 61))]
    assert reciprocal_rank_fusion([[1], [2]], weights=[0, 1])[0][0] == 2


def test_rrf_counts_a_repeated_id_once_at_its_best_rank() -> None:
    assert reciprocal_rank_fusion([[4, 4, 9]]) == [
        (4, pytest.approx(1 / 61)), (9, pytest.approx(1 / 63))]


def test_rrf_empty() -> None:
    assert reciprocal_rank_fusion([]) == []
    assert reciprocal_rank_fusion([[], []]) == []


@pytest.mark.parametrize("k", [0, -1, math.inf, math.nan, True])
def test_rrf_rejects_bad_k(k: float) -> None:
    with pytest.raises(ValueError, match="k must be"):
        reciprocal_rank_fusion([[1]], k=k)


@pytest.mark.parametrize("weights", [[1.0], [1.0, 2.0, 3.0], [1.0, -0.5], [1.0, math.nan]])
def test_rrf_rejects_bad_weights(weights: list[float]) -> None:
    with pytest.raises(ValueError, match="weight"):
        reciprocal_rank_fusion([[1], [2]], weights=weights)


def test_time_decay_values() -> None:
    assert time_decay(0, DAY) == 1.0
    assert time_decay(DAY, DAY) == pytest.approx(0.5)
    assert time_decay(3 * DAY, DAY) == pytest.approx(0.125)
    assert time_decay(-5 * DAY, DAY) == 1.0  # a clock ahead of ours: treated as new
    assert time_decay(1e9, math.inf) == 1.0


@pytest.mark.parametrize("half_life", [0.0, -1.0, math.nan])
def test_time_decay_rejects_bad_half_life(half_life: float) -> None:
    with pytest.raises(ValueError, match="half-life"):
        time_decay(1.0, half_life)
    with pytest.raises(ValueError, match="half-life"):
        fuse_with_decay([[1]], {1: 0.0}, half_life)


def test_time_decay_rejects_nan_age() -> None:
    with pytest.raises(ValueError, match="NaN"):
        time_decay(math.nan, DAY)


def test_fuse_with_decay_reorders_by_age() -> None:
    rankings = [[1, 2], [1, 2]]
    # Without decay 1 leads; a year-old 1 against a fresh 2 loses its lead.
    assert fuse_with_decay(rankings, {1: 0, 2: 0}, 30 * DAY)[0][0] == 1
    fused = fuse_with_decay(rankings, {1: 365 * DAY, 2: 0}, 30 * DAY)
    assert [i for i, _ in fused] == [2, 1]
    # floor 1 turns decay off; floor 0.5 keeps half of an ancient memory's score.
    assert fuse_with_decay(rankings, {1: 365 * DAY, 2: 0}, 30 * DAY, floor=1.0)[0][0] == 1
    floored = dict(fuse_with_decay([[1]], {1: 1e12}, DAY, floor=0.5))
    assert floored[1] == pytest.approx(0.5 / 61)


def test_fuse_with_decay_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="no age"):
        fuse_with_decay([[1, 2]], {1: 0.0}, DAY)
    with pytest.raises(ValueError, match="floor"):
        fuse_with_decay([[1]], {1: 0.0}, DAY, floor=1.5)
    with pytest.raises(ValueError, match="weights"):
        fuse_with_decay([[1]], {1: 0.0}, DAY, weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="k must be"):
        fuse_with_decay([[1]], {1: 0.0}, DAY, k=0)


# -- properties -------------------------------------------------------------------------


@given(rankings, ids)
def test_an_id_first_everywhere_ends_first(lists: list[list[int]], top: int) -> None:
    lists = [[top, *(i for i in r if i != top)] for r in lists]
    assert reciprocal_rank_fusion(lists)[0][0] == top


@given(rankings, ranking)
def test_adding_a_ranking_only_raises_scores(lists: list[list[int]], extra: list[int]) -> None:
    before = dict(reciprocal_rank_fusion(lists))
    after = dict(reciprocal_rank_fusion([*lists, extra]))
    assert set(before) <= set(after)
    for item, score in before.items():
        if item in extra:
            assert after[item] > score
        else:
            assert after[item] == pytest.approx(score)
    for item in extra:
        assert after[item] > before.get(item, 0.0)


@given(rankings, st.integers(min_value=1, max_value=1000))
def test_fused_results_are_sorted_and_deterministic(lists: list[list[int]], k: int) -> None:
    fused = reciprocal_rank_fusion(lists, k=k)
    keys = [(-score, item) for item, score in fused]
    assert keys == sorted(keys)
    assert fused == reciprocal_rank_fusion([list(r) for r in lists], k=k)
    assert {i for i, _ in fused} == {i for r in lists for i in r}


@given(rankings, st.lists(st.floats(0, 1e9), min_size=51, max_size=51),
       st.floats(1.0, 1e8), st.floats(0.0, 1.0))
def test_decayed_results_are_sorted_and_bounded(lists: list[list[int]], age_list: list[float],
                                                half_life: float, floor: float) -> None:
    ages = dict(enumerate(age_list))
    plain = dict(reciprocal_rank_fusion(lists))
    fused = fuse_with_decay(lists, ages, half_life, floor=floor)
    keys = [(-score, item) for item, score in fused]
    assert keys == sorted(keys)
    assert fused == fuse_with_decay(lists, ages, half_life, floor=floor)
    for item, score in fused:
        assert floor * plain[item] - 1e-12 <= score <= plain[item] + 1e-12


@given(st.floats(0, 1e9), st.floats(0, 1e9), st.floats(1.0, 1e8))
def test_decay_is_monotone(a: float, b: float, half_life: float) -> None:
    young, old = sorted((a, b))
    assert 0.0 <= time_decay(old, half_life) <= time_decay(young, half_life) <= 1.0


@given(st.floats(0, 1e7), st.floats(1.0, 1e7))
def test_decay_halves_every_half_life(age: float, half_life: float) -> None:
    assert time_decay(age + half_life, half_life) == pytest.approx(
        0.5 * time_decay(age, half_life), rel=1e-9, abs=1e-300)
