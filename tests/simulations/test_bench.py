"""`make bench` harness: a quick run writes a well-formed result with paired ratios."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_store_benchmark_quick(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "covey.simulations.bench", "--only", "store", "--quick",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    document = json.loads((tmp_path / "store.json").read_text())
    assert document["benchmark"] == "store"
    assert document["config"]["quick"] is True
    assert document["machine"]["cpu_count"]
    text = json.dumps(document["results"])
    assert "ratio" in text and "unlock" in text
