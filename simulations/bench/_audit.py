"""Audit reports: how long a pod report and a run report's empirical tests take.

The pod report (counts, encryption, a plaintext scan of every file covey wrote, the
ledger, egress, the chain) is timed on a pod holding ``memories`` memories and as many
messages, against ``covey pod status`` on the same pod in the same run; the run
report's empirical tests (two replica trainings, the second with 1,000 canary clients;
secret exposure; membership inference) are timed with their default size against the
10-minute aim.
"""

from __future__ import annotations

import secrets
import sys
import time
from pathlib import Path
from typing import Any

from covey._tempdirs import temporary_directory

__all__ = ["run"]


def _fill(pod: Any, count: int) -> None:
    with pod.store.transaction() as c:
        c.execute("INSERT INTO conversations (session_id, started_at) VALUES ('s', 'now')")
        for i in range(count):
            text = f"note {i}: the garden on day {i % 28} and a call with Ana about {i}"
            pod.memories.insert(c, text, "note", {"source": "bench"})
            c.execute("INSERT INTO messages (conversation_id, role, content, created_at)"
                      " VALUES (1, 'user', ?, 'now')", (text + " (said)",))


def run(quick: bool = False) -> dict[str, Any]:
    """Time both reports."""
    from covey.device import Pod, pod_audit
    from covey.privacy import EmpiricalConfig, pod_report
    from covey.simulations._config import SimulationConfig
    from covey.simulations._replica import audit_run
    from covey.simulations._simulate import simulate

    memories = 200 if quick else 2000
    results: dict[str, Any] = {}
    with temporary_directory("covey-bench-") as tmp:
        with Pod.create(Path(tmp) / "pod", secrets.token_urlsafe(12)) as pod:
            print(f"  [audit] pod with {memories} memories", file=sys.stderr, flush=True)
            _fill(pod, memories)
            t0 = time.perf_counter()
            pod.status()
            status_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            report = pod_report(pod_audit(pod))
            pod_s = time.perf_counter() - t0
        results["pod_report"] = {"seconds": round(pod_s, 3), "status_seconds": round(status_s, 3),
                                 "ratio_to_status": round(pod_s / status_s, 2),
                                 "files_scanned": report["summary"]["files_scanned"],
                                 "aim_seconds": 5.0}
        print("  [audit] a small simulated run and its empirical tests", file=sys.stderr,
              flush=True)
        out = Path(tmp) / "run"
        simulate(SimulationConfig(pods=6, rounds=2, clients_per_round=3, target_epsilon=4.0,
                                  eval_examples=20), out)
        empirical = EmpiricalConfig(rounds=2, candidates=200) if quick else EmpiricalConfig()
        t0 = time.perf_counter()
        report = audit_run(out, empirical=True, config=empirical)
        run_s = time.perf_counter() - t0
        found = report["summary"]["empirical"]
        canary = found["dp"]["canary"]
        results["run_report"] = {"seconds": round(run_s, 1), "aim_seconds": 600.0,
                                 "exposure_no_dp": round(found["no_dp"]["mean_exposure"], 2),
                                 "exposure_dp": round(found["dp"]["mean_exposure"], 2),
                                 "auc_no_dp": round(found["no_dp"]["auc"], 3),
                                 "auc_dp": round(found["dp"]["auc"], 3),
                                 "membership_bound_no_dp": round(
                                     found["no_dp"]["epsilon_lower_bound"], 3),
                                 "membership_provable": round(
                                     found["membership_provable_bound"], 3),
                                 "epsilon_theory": round(found["dp"]["epsilon_theory"], 3),
                                 "canary_epsilon": canary["epsilon"],
                                 "canary_threshold": round(canary["threshold"], 3),
                                 "red_flags": [f["code"] for f in report["red_flags"]]}
    p, r = results["pod_report"], results["run_report"]
    summary = [f"pod report on {memories} memories: {p['seconds']:.2f} s "
               f"({p['ratio_to_status']:.1f}x `pod status`; aim 5 s)",
               f"run report with empirical tests: {r['seconds']:.0f} s (aim 600 s); secret "
               f"exposure {r['exposure_no_dp']} bits without DP, {r['exposure_dp']} with DP; "
               f"canary-client epsilon {r['canary_epsilon']} against the replica's theory "
               f"{r['epsilon_theory']} (flag above {r['canary_threshold']}); membership "
               f"bound {r['membership_bound_no_dp']} without DP (at most "
               f"{r['membership_provable']} at this size)"]
    return {"config": {"memories": memories, "quick": quick}, "results": results,
            "summary": summary}
