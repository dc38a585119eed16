"""The run's randomness as an attacker with the run's files sees it: the noise cannot be
recomputed from anything the run wrote, and only a run with an explicit seed is
reproducible (and says it is not private)."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from covey.aggregator._registry import Registry
from covey.aggregator._rounds import (
    PodReply,
    RunConfig,
    checkpoint_path,
    round_noise,
    run_federated,
)
from covey.errors import InvalidInputError
from covey.models import Adapter
from covey.privacy import DPConfig, SeedRatchet
from covey.protocols import RoundMessage

SHAPE_A, SHAPE_B = (4, 64), (64, 4)  # a small adapter: 512 coordinates
SIZE = 512


def _start(registry: Registry) -> str:
    adapter = Adapter({"x.lora_A": np.zeros(SHAPE_A, np.float32),
                       "x.lora_B": np.zeros(SHAPE_B, np.float32)})
    version, _ = registry.add(adapter.to_bytes(), parent=None, round=0, run_id="r",
                              metrics={"perplexity": 10.0}, epsilon=0.0)
    registry.activate(version.id)
    return version.id


class FixedPods:
    """Pods that answer every round with a fixed update of norm below C (so the clipped
    sum is known exactly to the test, as it would be to nobody in a real run)."""

    def __init__(self, n: int) -> None:
        rng = np.random.default_rng(123)
        self.updates = {i: (rng.normal(size=SIZE) * 0.01).astype(np.float32)
                        for i in range(1, n + 1)}
        self.sampled: list[list[int]] = []

    def node_ids(self) -> list[int]:
        return sorted(self.updates)

    def train(self, nodes: Sequence[int], payload: RoundMessage, timeout: float
              ) -> list[PodReply]:
        self.sampled.append(list(nodes))
        return [PodReply(n, values=self.updates[n], version=str(payload.version["id"]))
                for n in nodes]


def _run(tmp: Path, cfg: RunConfig, pods: FixedPods, **kw: Any) -> dict[str, Any]:
    registry = Registry(tmp / "registry")
    if registry.current_id is None:
        _start(registry)
    (tmp / "runs").mkdir(exist_ok=True)
    return run_federated(pods, registry, cfg, "run-1", lambda _: {"perplexity": 10.0},
                         tmp / "runs" / "run-1.json", **kw)


def _cfg(rounds: int = 3, q: float = 1.0, seed: int | None = None, **dp: Any) -> RunConfig:
    return RunConfig(rounds=rounds, dp=DPConfig(mode="central", noise_multiplier=1.0,
                                                clip_norm=1.0, sample_rate=q, delta=1e-3, **dp),
                     min_pods=1, wait_timeout=1.0, reproducible_seed=seed)


def _noise_of_last_round(tmp: Path, pods: FixedPods, record: dict[str, Any]) -> np.ndarray:
    """What the aggregator added in the last round: the published delta times the expected
    number of pods, minus the true sum of clipped updates."""
    registry = Registry(tmp / "registry")
    last = registry.get(record["rounds"][-1]["version"])[1]
    before = registry.get(record["rounds"][-2]["version"])[1]
    delta = Adapter.from_bytes(last).flat() - Adapter.from_bytes(before).flat()
    expected = record["config"]["dp"]["sample_rate"] * record["population"]
    true_sum = sum(pods.updates[n] for n in pods.sampled[-1]).astype(np.float64)
    return delta.astype(np.float64) * expected - true_sum


def _generator_states(obj: Any) -> Iterator[dict[str, Any]]:
    if isinstance(obj, dict):
        if "bit_generator" in obj and "state" in obj:
            yield obj
        for v in obj.values():
            yield from _generator_states(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _generator_states(v)


def _attack(files: list[Path], noise: np.ndarray) -> str | None:
    """Every way an attacker holding ``files`` could regenerate ``noise``; which worked."""
    std = float(noise.std())
    for path in files:
        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            continue
        # 1. a NumPy generator's state: step it back over the last draws (PCG64.advance)
        for state in _generator_states(data):
            for back in range(SIZE, SIZE + 64):
                bits = np.random.PCG64()
                bits.state = state
                bits.advance(-back)
                if np.allclose(np.random.Generator(bits).normal(0, std, SIZE), noise,
                               atol=1e-5 * std):
                    return f"generator state in {path.name}"
        # 2. any seed the files name, used directly
        seeds = {v for k, v in _walk(data) if "seed" in k and isinstance(v, int)}
        for seed in seeds:
            if np.allclose(np.random.default_rng(seed).normal(0, std, SIZE), noise,
                           atol=1e-5 * std):
                return f"seed {seed} in {path.name}"
        # 3. a sampling ratchet's state, run forwards as the run would have
        for key, value in _walk(data):
            if key == "ratchet" and isinstance(value, str) and len(value) == 64:
                return f"a ratchet state left in {path.name}"
    return None


def _walk(obj: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield str(k), v
            yield from _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v)


def test_the_noise_cannot_be_recomputed_from_what_the_run_wrote(tmp_path: Path) -> None:
    pods = FixedPods(6)
    record = _run(tmp_path, _cfg(), pods)
    noise = _noise_of_last_round(tmp_path, pods, record)
    assert noise.std() == pytest.approx(1.0, rel=0.15)  # z * C = 1 on the sum
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert _attack(written, noise) is None
    assert record["randomness"]["private"] and not record["randomness"]["reproducible"]
    assert not checkpoint_path(tmp_path / "runs" / "run-1.json").exists()


def test_the_attack_works_where_the_noise_is_seeded(tmp_path: Path) -> None:
    # The attacker above is real: against the seeded noise of a reproducible run (whose
    # record says it is not private) the seed alone regenerates the noise exactly.
    pods = FixedPods(6)
    cfg = _cfg(seed=5)
    record = _run(tmp_path, cfg, pods)
    assert record["randomness"] == {**record["randomness"], "reproducible": True,
                                    "private": False, "seed": 5}
    noise = _noise_of_last_round(tmp_path, pods, record)
    ratchet = SeedRatchet.from_seed(5)
    for _ in range(cfg.rounds):
        round_seed = ratchet.advance()
    regenerated = round_noise(cfg, round_seed).normal(1.0, SIZE)
    np.testing.assert_allclose(regenerated, noise, atol=1e-5)


def test_a_private_runs_noise_is_fresh_each_time(tmp_path: Path) -> None:
    first, second = FixedPods(4), FixedPods(4)
    a = _run(tmp_path / "a", _cfg(rounds=2), first)
    b = _run(tmp_path / "b", _cfg(rounds=2), second)
    noise_a = _noise_of_last_round(tmp_path / "a", first, a)
    noise_b = _noise_of_last_round(tmp_path / "b", second, b)
    assert abs(float(np.corrcoef(noise_a, noise_b)[0, 1])) < 0.25  # 512 draws: |r| ~ 0.04


def test_records_versions_and_the_registry_are_private_files(tmp_path: Path) -> None:
    _run(tmp_path, _cfg(rounds=2), FixedPods(4))
    public = {tmp_path / "registry" / "signing.pub"}  # what pods pin: public on purpose
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p not in public]
    assert files
    loose = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode))
             for p in files if stat.S_IMODE(p.stat().st_mode) & 0o077}
    assert loose == {}


def test_a_resumed_seeded_run_samples_as_an_uninterrupted_one(tmp_path: Path) -> None:
    whole = FixedPods(12)
    _run(tmp_path / "whole", _cfg(rounds=4, q=0.5, seed=9), whole)
    split = FixedPods(12)

    class Interrupt(Exception):
        pass

    def stop_after_two(stats: dict[str, Any]) -> None:
        if stats["round"] == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        _run(tmp_path / "split", _cfg(rounds=4, q=0.5, seed=9), split, on_round=stop_after_two)
    saved = checkpoint_path(tmp_path / "split" / "runs" / "run-1.json")
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    state = json.loads(saved.read_text())["ratchet"]
    assert state not in (tmp_path / "split" / "runs" / "run-1.json").read_text()
    _run(tmp_path / "split", _cfg(rounds=4, q=0.5, seed=9), split, resume=True)
    assert split.sampled == whole.sampled
    assert len({tuple(s) for s in whole.sampled}) > 1  # the sample changes by round


def test_the_checkpoint_does_not_reveal_past_samples() -> None:
    # The sample of a round is a keyed hash of that round's seed; the checkpoint holds
    # only the ratchet's next state. Running the ratchet forward from it never meets a
    # past seed (SHA-256 cannot be run backwards, unlike PCG64's advance(-k)).
    ratchet = SeedRatchet()
    past = [ratchet.advance() for _ in range(5)]
    resumed = SeedRatchet(ratchet.state)
    future = [resumed.advance() for _ in range(1000)]
    assert not set(past) & set(future)
    assert ratchet.state not in past


def test_delta_must_be_below_one_over_n(tmp_path: Path) -> None:
    cfg = RunConfig(rounds=1, dp=DPConfig(noise_multiplier=1.0, delta=0.2), min_pods=1,
                    wait_timeout=1.0)
    with pytest.raises(InvalidInputError, match="1/N"):
        _run(tmp_path, cfg, FixedPods(5))
