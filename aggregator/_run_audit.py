"""The facts of the run report (``covey audit --run DIR``): a run record and its releases.

Run records are written by ``covey train`` and ``covey simulate`` alike (``runs/<id>.json``
beside the run's ``registry/``); :func:`covey.privacy.run_report` renders and judges what
this module reads.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from covey.aggregator._registry import Registry
from covey.errors import InvalidInputError
from covey.models import Adapter
from covey.privacy import RunAudit

__all__ = ["find_record", "run_audit"]


def find_record(path: Path) -> Path:
    """The run record at ``path``: the file itself, or the newest ``runs/*.json`` in it.

    Raises:
        InvalidInputError: nothing that looks like a run record there.
    """
    if path.is_file():
        return path
    folder = path / "runs" if (path / "runs").is_dir() else path
    records = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime) \
        if folder.is_dir() else []
    if not records:
        raise InvalidInputError(f"no run record (runs/*.json) in {path}")
    return records[-1]


def _released_deltas(record: dict[str, Any], record_path: Path
                     ) -> list[tuple[dict[str, Any], np.ndarray]] | None:
    """Each released round's stats and delta (the version minus its parent), read from
    the registry beside ``runs/``; None when it is not there."""
    folder = record_path.parent.parent / "registry"
    if not (folder / "signing.key").exists():  # Registry() would create one
        return None
    registry = Registry(folder)
    out = []
    try:
        for stats in record["rounds"]:
            if "version" not in stats:
                continue
            version, data, _ = registry.get(stats["version"])
            if version.parent is None:
                continue
            parent = Adapter.from_bytes(registry.get(version.parent)[1]).flat()
            delta = Adapter.from_bytes(data).flat().astype(np.float64) - parent
            out.append((stats, delta))
    except (OSError, ValueError, KeyError):
        return None
    return out


def run_audit(path: Path) -> RunAudit:
    """The facts of the run record at ``path`` (a file, or a folder holding ``runs/``).

    Raises:
        InvalidInputError: no run record there, or one that does not state its mechanism.
    """
    record_path = find_record(path)
    try:
        run = RunAudit(json.loads(record_path.read_text()), record_path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidInputError(f"{record_path} is not a readable run record ({exc})"
                                ) from None
    # Only a private run's releases carry noise to check.
    if run.dp.private and run.record["rounds"]:
        run = replace(run, released=_released_deltas(run.record, record_path))
    return run
