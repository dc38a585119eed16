"""Simulation throughput: the ``fast`` engine against Flower's Simulation Runtime.

Both engines, and the fast engine over real encrypted pods, run the same configuration
(pods, rounds, clients per round, DP, seed) in the same run, each on every core
(``workers`` = CPU count: Ray actors for ``flower``, worker processes or threads for
``fast``). Throughput is client updates per second over the rounds, and over the rounds
after the first (start-up of workers, Ray and stores excluded).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from covey._tempdirs import temporary_directory

__all__ = ["run"]


def run(quick: bool = False) -> dict[str, Any]:
    """Time one simulation per engine."""
    from covey.simulations._config import SimulationConfig
    from covey.simulations._simulate import simulate

    pods, rounds, clients = (10, 2, 5) if quick else (100, 5, 20)
    workers = os.cpu_count() or 1
    results: dict[str, Any] = {}
    with temporary_directory("covey-bench-") as tmp:
        for name, engine, encrypted in (("fast", "fast", False), ("flower", "flower", False),
                                        ("fast_encrypted_pods", "fast", True)):
            print(f"  [engines] {name}: {pods} pods, {rounds} rounds of ~{clients}",
                  file=sys.stderr, flush=True)
            cfg = SimulationConfig(pods=pods, rounds=rounds, clients_per_round=clients,
                                   target_epsilon=8.0, eval_examples=50, seed=0,
                                   engine=engine, workers=workers, encrypted_pods=encrypted)
            started = time.perf_counter()
            record = simulate(cfg, Path(tmp) / name)
            total = time.perf_counter() - started
            sim = record["simulation"]
            # After the first round: worker processes, Ray actors and stores are up.
            steady = record["rounds"][1:]
            steady_rate = (sum(r["accepted"] for r in steady)
                           / max(1e-9, sum(r["seconds"] for r in steady)))
            results[name] = {"seconds": sim["seconds"], "client_updates": sim["client_updates"],
                             "updates_per_second": sim["updates_per_second"],
                             "steady_updates_per_second": round(steady_rate, 3),
                             "seconds_with_setup": round(total, 2),
                             "final_perplexity": sim["global_metrics"]["perplexity"]}
    ratio = results["fast"]["updates_per_second"] / results["flower"]["updates_per_second"]
    results["fast_over_flower"] = round(ratio, 2)
    steady_ratio = (results["fast"]["steady_updates_per_second"]
                    / results["flower"]["steady_updates_per_second"])
    results["fast_over_flower_steady"] = round(steady_ratio, 2)
    store = results["fast"]["updates_per_second"] / results["fast_encrypted_pods"][
        "updates_per_second"]
    results["encrypted_pods_slowdown"] = round(store, 2)
    summary = [f"{engine}: {r['client_updates']} client updates in {r['seconds']:.1f} s, "
               f"{r['updates_per_second']:.2f}/s" for engine, r in results.items()
               if isinstance(r, dict)]
    summary.append(f"fast engine throughput {ratio:.1f}x Flower's Simulation Runtime "
                   f"(aim 10x); {steady_ratio:.1f}x after the first round")
    summary.append(f"encrypted pods (unlock, take part, ledger, audit each round): "
                   f"{store:.2f}x slower than in-memory pods")
    config = {"pods": pods, "rounds": rounds, "clients_per_round": clients,
              "target_epsilon": 8.0, "workers": workers}
    return {"config": config, "results": results, "summary": summary}
