"""`covey simulate`: the dataset's users as pods, through the aggregator's own rounds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from covey.errors import InvalidInputError
from covey.models import share_of
from covey.privacy import GaussianRounds, epsilon_spent
from covey.simulations._config import SimulationConfig
from covey.simulations._population import population
from covey.simulations._simulate import simulate
from covey.simulations._sizing import worker_malloc
from tests.conftest import Covey


def test_population_holds_only_federated_users() -> None:
    users = population(SimulationConfig(min_messages=2))
    assert len(users) > 500
    assert all(share_of(u.user_id) == "federated" for u in users)
    assert all(len(u.train) >= 2 for u in users)
    chosen = population(SimulationConfig(pods=30, seed=3))
    assert chosen == population(SimulationConfig(pods=30, seed=3)) and len(chosen) == 30


def test_a_small_private_simulation(tmp_path: Path) -> None:
    cfg = SimulationConfig(pods=8, rounds=2, clients_per_round=4, target_epsilon=4.0,
                           eval_examples=30, seed=1)
    record = simulate(cfg, tmp_path)
    assert record["status"] == "completed" and len(record["rounds"]) == 2
    dp = record["config"]["dp"]
    assert dp["sample_rate"] == 0.5 and dp["delta"] == pytest.approx(0.1 / 8)
    expected = epsilon_spent([GaussianRounds(dp["noise_multiplier"], 0.5, 2)], dp["delta"])
    assert record["epsilon"] == pytest.approx(expected) and record["epsilon"] <= 4.0
    summary = json.loads((tmp_path / "population.json").read_text())
    assert summary["users"] == 8 == record["simulation"]["population"]["users"]
    assert record["simulation"]["client_updates"] == sum(r["accepted"] for r in record["rounds"])
    personal = record["simulation"]["personalized_metrics"]
    assert personal["users"] > 0 and math.isfinite(personal["perplexity"])
    saved = json.loads(Path(record["record_path"]).read_text())
    assert saved["epsilon"] == record["epsilon"]
    assert all("perplexity" in r and "version" in r for r in saved["rounds"])


def test_without_dp_the_run_says_so(tmp_path: Path) -> None:
    record = simulate(SimulationConfig(pods=4, rounds=1, clients_per_round=4,
                                       target_epsilon=math.inf, eval_examples=20), tmp_path)
    assert record["epsilon"] is None
    assert record["mechanism"]["guarantee"] == "none"
    assert record["rounds"][0]["accepted"] == 4


def test_impossible_configurations_fail_before_any_work(tmp_path: Path, covey: Covey) -> None:
    with pytest.raises(InvalidInputError, match="clients per round"):
        simulate(SimulationConfig(pods=3, clients_per_round=5), tmp_path / "a")
    with pytest.raises(InvalidInputError, match="no noise multiplier"):
        simulate(SimulationConfig(pods=3, clients_per_round=3, rounds=100_000,
                                  target_epsilon=1e-6, delta=1e-9), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    result = covey("simulate", "--out", str(tmp_path / "c"), "--pods", "100000")
    assert result.returncode == 2 and result.stderr.startswith("error: only")


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    cfg = SimulationConfig(pods=6, rounds=3, clients_per_round=3, target_epsilon=6.0,
                           eval_examples=20, seed=4)
    whole = simulate(cfg, tmp_path / "whole")

    class Interrupted(Exception):
        pass

    def stop_after_first(stats: dict[str, object]) -> None:
        if stats["round"] == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        simulate(cfg, tmp_path / "split", on_round=stop_after_first)
    with pytest.raises(InvalidInputError, match="different run"):
        simulate(SimulationConfig(**{**cfg.__dict__, "rounds": 4}), tmp_path / "split",
                 resume=True)
    resumed = simulate(cfg, tmp_path / "split", resume=True)

    def essence(record: dict[str, object]) -> list[tuple[object, ...]]:
        return [(r["round"], r["sampled"], r["accepted"], r.get("perplexity"), r["epsilon"])
                for r in record["rounds"]]  # type: ignore[attr-defined]

    assert essence(resumed) == essence(whole) and len(resumed["rounds"]) == 3
    assert resumed["epsilon"] == whole["epsilon"]
    from covey.aggregator._registry import Registry

    final = [Registry(tmp_path / d / "registry").get(r["final_version"])[0].sha256
             for d, r in (("whole", whole), ("split", resumed))]
    assert final[0] == final[1]  # the same global adapter, byte for byte
    with pytest.raises(InvalidInputError, match="no interrupted simulation"):
        simulate(cfg, tmp_path / "whole", resume=True)


def test_a_sweep_writes_what_its_runs_measured(tmp_path: Path) -> None:
    from covey.aggregator._registry import Registry
    from covey.simulations._sweep import parse_epsilons, sweep

    cfg = SimulationConfig(pods=6, rounds=1, clients_per_round=6, eval_examples=20, seed=2)
    result = sweep(cfg, parse_epsilons("4,inf"), tmp_path)
    for name in ("sweep.json", "sweep.html", "utility_vs_epsilon.png", "utility_vs_rounds.png"):
        assert (tmp_path / name).stat().st_size > 200
    saved = json.loads((tmp_path / "sweep.json").read_text())
    rows = {r["method"]: r for r in saved["table"]}
    assert set(rows) == {"base model", "local-only fine-tuning", "FedAvg (no DP)",
                         "DP-FedAvg eps=4"}
    for method, folder in (("FedAvg (no DP)", "eps-inf"), ("DP-FedAvg eps=4", "eps-4")):
        record = json.loads(Path(saved["runs"]["inf" if "no DP" in method else "4"]
                                 ["record"]).read_text())
        final = Registry(tmp_path / folder / "registry").get(record["final_version"])[0]
        assert rows[method]["perplexity"] == final.metrics["perplexity"]
    assert rows["DP-FedAvg eps=4"]["spent"] <= 4.0
    assert rows["FedAvg (no DP)"]["kept"] == 1.0 and rows["base model"]["kept"] == 0.0
    page = (tmp_path / "sweep.html").read_text()
    assert f"{rows['DP-FedAvg eps=4']['perplexity']:.2f}" in page
    assert result["table"] == saved["table"]
    with pytest.raises(ValueError):
        parse_epsilons("4,-1")


def test_worker_processes_give_the_same_aggregate(tmp_path: Path) -> None:
    from covey.aggregator._registry import Registry
    from covey.models import Adapter

    cfg = SimulationConfig(pods=6, rounds=2, clients_per_round=6, target_epsilon=8.0,
                           eval_examples=20, seed=5, workers=1, precision="fp32")
    one = simulate(cfg, tmp_path / "one")
    two = simulate(SimulationConfig(**{**cfg.__dict__, "workers": 2}), tmp_path / "two")
    assert two["simulation"]["workers"] == 2
    # The workers run on tcmalloc where it is installed (`make setup` installs it).
    assert two["simulation"]["worker_allocator"] == (
        "tcmalloc" if worker_malloc() else "glibc")
    assert one["simulation"]["worker_allocator"] is None  # no worker processes
    # Two workers batch different groups of pods together: the same updates up to float
    # rounding (the order of sums inside a batched pass), not bit for bit. AdamW divides
    # by the root of its second moment, which magnifies rounding where a gradient is
    # near zero (one coordinate of 49,152 moved by 7.5e-4 once): the vectors agree to
    # 1e-4 of their length, far below the noise added to the average.
    for version in range(1, 3):
        adapters = [Adapter.from_bytes(Registry(tmp_path / d / "registry").get(
            next(v.id for v in Registry(tmp_path / d / "registry").versions()
                 if v.round == version))[1]).flat() for d in ("one", "two")]
        gap = np.linalg.norm(adapters[0] - adapters[1]) / np.linalg.norm(adapters[1])
        assert gap < 1e-4, gap
    # Two workers also evaluate each version, each on part of the examples.
    assert [r.get("perplexity") for r in one["rounds"]] == \
        pytest.approx([r.get("perplexity") for r in two["rounds"]], rel=1e-5)
    assert one["simulation"]["base_metrics"] == pytest.approx(two["simulation"]["base_metrics"])


def test_too_little_memory_fails_before_any_work(tmp_path: Path) -> None:
    from covey.simulations._sizing import check_memory

    cfg = SimulationConfig(pods=3, clients_per_round=3, engine="flower")
    with pytest.raises(InvalidInputError, match="flower engine with 8 workers needs about"):
        check_memory(cfg, 8, available=2 * 2**30)
    check_memory(cfg, 2, available=64 * 2**30)  # fits: no error
    with pytest.raises(InvalidInputError, match="encrypted-pods runs on the fast engine"):
        SimulationConfig(engine="flower", encrypted_pods=True)


def test_encrypted_pods_train_from_real_stores(tmp_path: Path) -> None:
    from covey.device import Pod

    cfg = SimulationConfig(pods=3, rounds=1, clients_per_round=3, target_epsilon=8.0,
                           eval_examples=20, seed=2, encrypted_pods=True, workers=2)
    record = simulate(cfg, tmp_path)
    assert record["rounds"][0]["accepted"] == record["rounds"][0]["sampled"] > 0
    secret = tmp_path / "pods" / "passphrase"
    assert secret.stat().st_mode & 0o777 == 0o600
    # every pod charged the run when it was announced, and recorded each round it
    # answered, in its own ledger, as a real pod does
    from covey.device.federation._budget import pod_ledger

    charged, answered = 0, 0
    for home in sorted((tmp_path / "pods").glob("pod*")):
        with Pod.open(home, secret.read_text()) as pod:
            releases = [e.release for e in pod_ledger(pod).history()]
            charged += sum(r.rounds for r in releases if r.round == 0)
            answered += sum(1 for r in releases if r.round >= 1)
    assert charged == 3 * cfg.rounds
    assert answered == record["rounds"][0]["accepted"]


def test_engines_are_chosen_by_name() -> None:
    from covey.simulations._engines import ENGINES
    from covey.simulations._pool import MemoryPods

    assert sorted(ENGINES) == ["fast", "flower"]
    with pytest.raises(InvalidInputError,
                       match=r"engine must be one of \('fast', 'flower'\), got 'ray'"):
        SimulationConfig(engine="ray")
    # One worker: no pool of processes, so nothing to spread the evaluation over.
    pods = MemoryPods([], None, None, SimulationConfig(), workers=1)
    with pytest.raises(RuntimeError, match="no worker processes"):
        pods.tally(b"", [])
