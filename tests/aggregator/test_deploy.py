"""`covey aggregator stop` signals only the processes it started: a recorded pid that now
names someone else's process is left alone."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from covey._processes import ProcessRef, alive
from covey.aggregator._deploy import AggregatorHome


def test_stop_spares_a_process_that_took_a_recorded_pid(tmp_path: Path) -> None:
    bystander = subprocess.Popen(["sleep", "60"])
    ours = subprocess.Popen(["sleep", "60"])
    try:
        now = ProcessRef.of(bystander.pid)
        assert now is not None
        stale = f"{bystander.pid} {now.start - 1} {now.boot}"  # an earlier process's record
        (tmp_path / "processes.json").write_text(json.dumps({
            "superlink": {"pid": bystander.pid, "port": 1, "process": stale},
            "gateway": {"pid": bystander.pid, "port": 2},  # a bare pid, as before
            "metrics": {"pid": ours.pid, "port": 3, "process": str(ProcessRef.of(ours.pid))},
        }))
        home = AggregatorHome(tmp_path)
        assert set(home.processes) == {"metrics"}
        assert home.stop() == ["metrics"]
        ours.wait(timeout=20)
        assert alive(bystander.pid) and bystander.poll() is None
    finally:
        bystander.kill()
        ours.kill()
        bystander.wait()
