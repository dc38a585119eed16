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
   transaction). A pid file records the process's pid, start time and boot id: a stale
   file whose pid now names an unrelated process is removed, and that process is not
   signalled;
3. it stops the pod's SuperNode, if it joined a federation.

`covey stop --release` removes the flag (this one needs the passphrase, and is audited).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from covey._processes import ProcessRef, stop_refs
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
    me = ProcessRef.of(os.getpid())
    path.write_text(f"{me or os.getpid()}\n", encoding="utf-8")
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
    found: dict[ProcessRef, str] = {}
    for path in sorted((home / RUN_DIR).glob("*.pid")):
        try:
            ref = ProcessRef.parse(path.read_text())
        except OSError:
            continue
        # A file without a start time, or whose pid now names another process, is stale.
        if ref is not None and ref.pid != os.getpid() and ref.current():
            found[ref] = path.name.rsplit("-", 1)[0]
        else:
            path.unlink(missing_ok=True)
    killed = stop_refs(list(found), GRACE)
    from covey.device.federation._join import leave

    supernode = leave(home)
    return {"stopped_at": when, "processes": sorted(found.values()), "killed": len(killed),
            "supernode": supernode}


def release(home: Path) -> str | None:
    """Remove the flag; when the pod had been stopped (None when it was not)."""
    flag = home / STOP_FILE
    if not flag.exists():
        return None
    since = flag.read_text(encoding="utf-8", errors="replace").strip()
    flag.unlink()
    return since
