"""The two simulation engines run the same rounds: Flower's Simulation Runtime (Ray) and
the in-process ``fast`` engine give the same aggregate for the same seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from covey.aggregator._registry import Registry
from covey.models import Adapter
from covey.simulations._config import SimulationConfig
from covey.simulations._simulate import simulate

pytestmark = pytest.mark.slow


def _final_adapter(out: Path, record: dict) -> np.ndarray:
    _, data, _ = Registry(out / "registry").get(record["final_version"])
    return Adapter.from_bytes(data).flat()


def test_flower_and_fast_engines_give_the_same_aggregate(tmp_path: Path) -> None:
    # fp32: the claim is the same arithmetic in both engines; bf16 rounds differently in
    # batched and lone passes (tests/models/test_finetune.py bounds how much).
    cfg = SimulationConfig(pods=5, rounds=2, clients_per_round=3, target_epsilon=8.0,
                           eval_examples=20, seed=7, workers=1, engine="fast",
                           precision="fp32")
    fast = simulate(cfg, tmp_path / "fast")
    flower = simulate(SimulationConfig(**{**cfg.__dict__, "engine": "flower", "workers": 2}),
                      tmp_path / "flower")
    assert flower["simulation"]["engine"] == "flower"
    # The same pods were sampled and accepted each round ...
    assert [(r["sampled"], r["accepted"]) for r in fast["rounds"]] == \
        [(r["sampled"], r["accepted"]) for r in flower["rounds"]]
    assert all(r["accepted"] > 0 for r in flower["rounds"])
    # ... and the aggregate, noise included, is the same within float tolerance.
    a, b = _final_adapter(tmp_path / "fast", fast), _final_adapter(tmp_path / "flower", flower)
    assert np.abs(a).max() > 0
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert [r["perplexity"] for r in fast["rounds"]] == \
        pytest.approx([r["perplexity"] for r in flower["rounds"]], rel=1e-4)
    assert fast["epsilon"] == flower["epsilon"] <= 8.0
