"""`covey stop`: the fail-safe. Halts generation, sync, capture and training on the pod
at once, and keeps them halted until the user releases the pod.

It needs no passphrase, so it works when the person is in a hurry:

1. it writes ``STOPPED`` (the time, nothing else) in the pod home. Every long-running
   part checks it: generation between tokens, the sync loop and the capture loop on
   each tick, a federated round before training; and every command that would start
   one refuses while it is there;
2. it signals every covey process registered as running on this pod (``run/*.pid``:
   `covey serve`, `covey sync run`, `covey context run`, `covey chat`), SIGTERM first
   and SIGKILL after ``GRACE`` seconds (the store survives either: every write is a
   transaction);
3. it stops the pod's SuperNode, if it joined a federation.

`covey stop --release` removes the flag (this one needs the passphrase, and is audited).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from covey._processes import alive, stop_processes
from covey.errors import CoveyError

__all__ = ["GRACE", "STOP_FILE", "PodStoppedError", "check_not_stopped", "is_stopped",
           "release", "running", "stop"]

STOP_FILE = "STOPPED"
RUN_DIR = "run"
GRACE = 2.0


class PodStoppedError(CoveyError):
    """The pod was halted with `covey stop`."""

    exit_code = 11

    def __init__(self, since: str) -> None:
        super().__init__(f"this pod was stopped with `covey stop` at {since}; "
                         "`covey stop --release` lets it run again")


def is_stopped(home: Path) -> bool:
    return (home / STOP_FILE).exists()


def check_not_stopped(home: Path) -> None:
    """Raise PodStoppedError while the pod is halted."""
    flag = home / STOP_FILE
    if flag.exists():
        raise PodStoppedError(flag.read_text(encoding="utf-8", errors="replace").strip()[:40])


@contextlib.contextmanager
def running(home: Path, role: str) -> Iterator[None]:
    """Register this process as a running part of the pod while the block runs."""
    check_not_stopped(home)
    folder = home / RUN_DIR
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / f"{role}-{os.getpid()}.pid"
    path.write_text(f"{os.getpid()}\n", encoding="utf-8")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def stop(home: Path) -> dict[str, object]:
    """Halt everything running on the pod at ``home``; what was stopped."""
    home = home.expanduser().absolute()
    when = datetime.now(UTC).isoformat(timespec="seconds")
    if not is_stopped(home):
        (home / STOP_FILE).write_text(when + "\n", encoding="utf-8")
    pids: dict[int, str] = {}
    for path in sorted((home / RUN_DIR).glob("*.pid")):
        try:
            pid = int(path.read_text().strip())
        except (OSError, ValueError):
            continue
        if pid != os.getpid() and alive(pid):
            pids[pid] = path.name.rsplit("-", 1)[0]
        else:
            path.unlink(missing_ok=True)
    killed = stop_processes(list(pids), GRACE)
    from covey.device._join import leave

    supernode = leave(home)
    return {"stopped_at": when, "processes": sorted(pids.values()), "killed": len(killed),
            "supernode": supernode}


def release(home: Path) -> str | None:
    """Remove the flag; when the pod had been stopped (None when it was not)."""
    flag = home / STOP_FILE
    if not flag.exists():
        return None
    since = flag.read_text(encoding="utf-8", errors="replace").strip()
    flag.unlink()
    return since
