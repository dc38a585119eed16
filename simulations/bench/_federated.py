"""Federated rounds on the loopback, and the cost of differential privacy.

- Round wall time against the number of pods (3, 10, 20): a real SuperLink with TLS and
  SuperNode authentication, one SuperNode per pod, each pod training on 24 of its own
  examples; the steady-state figure is the second round (the first also starts each
  pod's ClientApp process and loads its model).
- Resident memory per SuperNode: the SuperNode and every process under it (its
  ClientApp holds the torch model), summed from /proc and divided by the pods.
- Update size: the bytes a pod sends (float32 LoRA delta) and the signed model version.
- The cost of DP: the same pods' round (local training, then aggregation) with clipping
  and noise against the same round without, in the same process and run.
"""

from __future__ import annotations

import secrets
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from covey._tempdirs import temporary_directory

__all__ = ["run"]


def _rss_tree(pid: int) -> int:
    from covey._processes import descendants

    total = 0
    for p in [pid, *descendants(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def _loopback(pods: int, rounds: int, users: list[Any]) -> dict[str, Any]:
    from covey._processes import free_port
    from covey.aggregator import AggregatorHome
    from covey.device import join, leave, node_key
    from covey.simulations._seeding import seed_pods

    passphrase = secrets.token_urlsafe(12)
    with temporary_directory("covey-bench-fed-") as tmp:
        agg = AggregatorHome(Path(tmp) / "agg")
        agg.make_certs()
        status = agg.start(port=free_port())
        homes = seed_pods(Path(tmp), users[:pods], passphrase)
        infos: list[dict[str, Any]] = []
        try:
            for home in homes:
                agg.admit(node_key(home))
            with ThreadPoolExecutor(4) as pool:
                infos = list(pool.map(lambda h: join(h, passphrase, status["superlink"],
                                                     agg.root_cert,
                                                     agg.registry().public_key_path), homes))
            record = agg.train({"run-name": f"bench-{pods}", "rounds": rounds,
                                "mode": "central", "noise-multiplier": 1.0,
                                "min-pods": pods, "eval-examples": 20,
                                "round-timeout": 600.0, "wait-timeout": 120.0})
            rss = [_rss_tree(int(i["pid"])) for i in infos]
        finally:
            for home in homes:
                leave(home)
            agg.stop()
    seconds = [r["seconds"] for r in record["rounds"]]
    return {"pods": pods, "round_seconds": seconds,
            "steady_round_s": seconds[-1], "accepted": [r["accepted"] for r in record["rounds"]],
            "rss_per_supernode_mib": round(float(np.mean(rss)) / 2**20, 1)}


def _dp_cost(users: list[Any], pods: int, repeats: int) -> dict[str, Any]:
    """One round's pod training and aggregation with DP against without, interleaved."""
    import torch

    from covey.aggregator import PodUpdate, aggregate
    from covey.device import train_update
    from covey.models import Adapter, FinetuneConfig, TinyLM, load_model
    from covey.privacy import DPConfig

    model, tok, _ = load_model()
    torch.manual_seed(0)
    adapter = Adapter.zeros_like(TinyLM(model.cfg))
    train = FinetuneConfig(epochs=1, seed=0)
    settings = {"private": DPConfig(mode="central", noise_multiplier=1.0, clip_norm=1.0),
                "local": DPConfig(mode="local", noise_multiplier=1.0, clip_norm=1.0),
                "plain": DPConfig(mode="central", noise_multiplier=0.0,
                                  clip_norm=float("inf"))}
    times: dict[str, list[float]] = {k: [] for k in settings}
    size = adapter.num_parameters
    for _ in range(repeats):
        for name, dp in settings.items():
            started = time.perf_counter()
            updates = []
            for i, user in enumerate(users[:pods]):
                u = train_update(model, tok, user.train[:24], adapter, train, dp)
                updates.append(PodUpdate(i, u.delta, u.examples, "v"))
            aggregate(updates, size, "v", dp, expected_pods=float(pods))
            times[name].append(time.perf_counter() - started)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {"pods": pods, "repeats": repeats,
            "round_s_median": {k: round(v, 3) for k, v in med.items()},
            "dp_over_plain": {"central": round(med["private"] / med["plain"], 4),
                              "local": round(med["local"] / med["plain"], 4)}}


def run(quick: bool = False) -> dict[str, Any]:
    """Loopback rounds at 3, 10 and 20 pods; update size; the cost of DP."""
    from covey.models import load_corpus

    users = [u for u in load_corpus().federated if len(u.train) >= 24]
    sizes, rounds = ((3,), 1) if quick else ((3, 10, 20), 2)
    loopback = []
    for n in sizes:
        print(f"  [federated] {n} pods on the loopback", file=sys.stderr, flush=True)
        loopback.append(_loopback(n, rounds, users))
    print("  [federated] cost of DP", file=sys.stderr, flush=True)
    cost = _dp_cost(users, 3 if quick else 10, 1 if quick else 3)
    from covey.models import Adapter, TinyLM, load_model

    model, _, _ = load_model()
    adapter = Adapter.zeros_like(TinyLM(model.cfg))
    update_bytes = adapter.num_parameters * 4
    version_bytes = len(adapter.to_bytes())
    summary = [f"round wall time, {r['pods']} pods: {r['steady_round_s']:.1f} s "
               f"({r['rss_per_supernode_mib']:.0f} MiB resident per SuperNode)"
               for r in loopback]
    summary += [f"update size: {update_bytes:,} bytes per pod (aim <= 524,288); signed "
                f"model version {version_bytes:,} bytes",
                f"cost of DP: a central-DP round takes {cost['dp_over_plain']['central']:.3f}x "
                f"and a local-DP round {cost['dp_over_plain']['local']:.3f}x a non-private "
                f"round (aim <= 1.1x)"]
    return {"config": {"pods": list(sizes), "rounds": rounds, "examples_per_pod": 24,
                       "mode": "central", "noise_multiplier": 1.0},
            "results": {"loopback": loopback, "update_bytes": update_bytes,
                        "version_bytes": version_bytes, "dp_cost": cost},
            "summary": summary}
