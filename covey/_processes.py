"""Processes covey starts and stops: Flower's SuperLink and SuperNodes, helpers' servers.

A process covey means to signal later is recorded as a :class:`ProcessRef` (pid, start
time, boot id), never by its pid alone: once the process ends its pid may be given to an
unrelated one, and a stale pid file must not get that process killed.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PRIVATE_UMASK", "SECRET_ENV", "ProcessRef", "alive", "child_env", "descendants",
           "flower_bin", "flower_env", "free_port", "secret_from_env", "stop_process",
           "stop_processes", "stop_refs", "stop_tree", "take_secrets"]

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")

# Read by the CLI for non-interactive use, and never handed on: a process covey starts
# gets what it needs another way (the round agent's data key comes down a pipe).
SECRET_ENV = ("COVEY_PASSPHRASE", "COVEY_NEW_PASSPHRASE")
_taken: dict[str, str] = {}
_PR_SET_DUMPABLE = 4
# The umask of the servers covey starts: whatever they create (Flower's state database,
# which holds every update a SuperLink relays, its logs, apps) is their user's alone.
PRIVATE_UMASK = 0o077
# Fields 50 and 51 of /proc/<pid>/stat (Linux >= 3.5): where the kernel keeps the
# environment block the process was started with, which /proc/<pid>/environ shows.
_ENV_START_FIELD = 50


def take_secrets() -> None:
    """Move ``SECRET_ENV`` out of this process's environment (the `covey` command does
    this first), so that no child inherits them and no reader of /proc/<pid>/environ
    finds them.

    ``os.environ.pop`` alone is not enough: it only unlinks libc's pointer, while the
    kernel keeps showing the block the process was started with. So, on Linux, the
    entries are also overwritten in place in that block, and a process that took a
    secret is made non-dumpable (``PR_SET_DUMPABLE`` 0), so that other processes of its
    user cannot read its memory, where the secret now lives, or its environment through
    /proc or ptrace (root still can).
    """
    _taken.clear()
    for name in SECRET_ENV:
        if name in os.environ:
            _taken[name] = os.environ.pop(name)
    if _taken and sys.platform.startswith("linux"):
        _no_dumps()
        _scrub_environ_block({name.encode() for name in SECRET_ENV})


def _no_dumps() -> None:
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)


def _scrub_environ_block(names: set[bytes]) -> int:
    """Zero every ``NAME=value`` of ``names`` in the environment block the kernel shows
    as /proc/self/environ; returns the number of bytes zeroed.

    The entries are no longer in libc's ``environ`` (``os.environ.pop`` unset them), so
    nothing reads those bytes any more; the kernel reads them live from this process's
    memory, as it does for ``setproctitle``'s rewritten command line.
    """
    import ctypes

    try:
        stat = Path("/proc/self/stat").read_text()
        fields = stat[stat.rfind(")") + 1:].split()  # from field 3 on
        start = int(fields[_ENV_START_FIELD - 3])
        end = int(fields[_ENV_START_FIELD - 2])
    except (OSError, IndexError, ValueError):
        return 0
    if not 0 < start < end:
        return 0
    block = ctypes.string_at(start, end - start)
    zeroed, offset = 0, 0
    for entry in block.split(b"\0"):
        if entry.partition(b"=")[0] in names:
            ctypes.memset(start + offset, 0, len(entry))
            zeroed += len(entry)
        offset += len(entry) + 1
    return zeroed


def secret_from_env(name: str) -> str | None:
    """A secret the environment gave this process (taken or still there)."""
    return _taken.get(name, os.environ.get(name))


def flower_bin(name: str) -> str:
    """The path of a command installed beside this Python (flwr, flower-superlink, ...)."""
    return str(Path(sys.executable).with_name(name))


def _inherited(name: str) -> bool:
    """Whether a variable of this process's environment may pass to a process covey
    starts: not a secret, and no Flower setting but its log level. Flower reads dozens
    of ``FLWR_*`` variables, some of which change what it exposes or where it fetches
    apps from (``FLWR_INTERNAL_GRPC_CONTROL_API=1`` makes a SuperLink serve a second,
    legacy gRPC Control API, by default on 0.0.0.0:9093; ``FLWR_SUPERGRID_*`` say
    where apps come from); covey sets the ones it means (:func:`flower_env`)."""
    if name in SECRET_ENV:
        return False
    return not name.startswith("FLWR_") or name == "FLWR_LOG_LEVEL"


def child_env() -> dict[str, str]:
    """This process's environment without the secrets in ``SECRET_ENV`` and without
    inherited Flower settings (``FLWR_*``, but for ``FLWR_LOG_LEVEL``)."""
    return {k: v for k, v in os.environ.items() if _inherited(k)}


def flower_env(flwr_home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower processes: our venv first, no network checks, no
    secrets, and only the Flower settings covey chooses."""
    env = child_env()
    env.update(PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
               FLWR_HOME=str(flwr_home), FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_TELEMETRY_ENABLED="0", PYTHONUNBUFFERED="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    env.update(extra or {})
    return env


def free_port() -> int:
    """A TCP port free on the loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True,
                         check=False).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2:
            children.setdefault(int(parts[1]), []).append(int(parts[0]))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not reaped) counts as stopped
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def stop_processes(pids: list[int], timeout: float = 15.0) -> list[int]:
    """SIGTERM every pid; SIGKILL those left after ``timeout``. Returns the killed ones."""
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    killed = [p for p in pids if alive(p)]
    for p in killed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    return killed


def stop_process(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM ``pid`` and everything it started; SIGKILL what is left after ``timeout``."""
    stop_processes([pid, *descendants(pid)], timeout)


def _boot_id() -> str:
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return ""


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks after boot (``/proc/<pid>/stat`` field 22)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count after the last ")".
    fields = stat[stat.rfind(")") + 1:].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class ProcessRef:
    """One process, by pid, start time and boot: the pid alone may since name another."""

    pid: int
    start: int
    boot: str

    @classmethod
    def of(cls, pid: int) -> ProcessRef | None:
        """The running process ``pid`` (None when it is gone or cannot be identified)."""
        start, boot = start_ticks(pid), _boot_id()
        return cls(pid, start, boot) if start is not None and boot else None

    @classmethod
    def parse(cls, text: str) -> ProcessRef | None:
        """A reference written by ``str(ref)``; None for anything else (a bare pid too)."""
        parts = text.split()
        if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
            return None
        return cls(int(parts[0]), int(parts[1]), parts[2])

    def __str__(self) -> str:
        return f"{self.pid} {self.start} {self.boot}"

    def current(self) -> bool:
        """Whether the process this names is still running (not a later one on its pid)."""
        return (self.boot == _boot_id() and start_ticks(self.pid) == self.start
                and alive(self.pid))


class _Pinned:
    """A process to signal, pinned by a pidfd where the kernel offers one."""

    def __init__(self, ref: ProcessRef, fd: int | None) -> None:
        self.ref, self.fd = ref, fd

    @classmethod
    def open(cls, ref: ProcessRef) -> _Pinned | None:
        """``ref`` pinned, once checked to name the recorded process; else None.

        With a pidfd, signals cannot reach a later process that reuses the pid, so
        nothing slips in between the check and the signal. Where pidfds are missing or
        forbidden (old kernels, some sandboxes), the check is repeated before each
        signal instead.
        """
        fd: int | None
        try:
            fd = os.pidfd_open(ref.pid)
        except ProcessLookupError:
            return None
        except OSError:
            fd = None
        if not ref.current():
            if fd is not None:
                os.close(fd)
            return None
        return cls(ref, fd)

    def signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            if self.fd is not None:
                signal.pidfd_send_signal(self.fd, sig)
            elif self.ref.current():
                os.kill(self.ref.pid, sig)

    def exited(self) -> bool:
        if self.fd is None:
            return not self.ref.current()
        poll = select.poll()
        poll.register(self.fd, select.POLLIN)  # a pidfd is readable once its process exits
        return bool(poll.poll(0))

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)


def stop_refs(refs: list[ProcessRef], timeout: float = 15.0) -> list[ProcessRef]:
    """SIGTERM each referenced process still running, SIGKILL those left after
    ``timeout``; a ref whose pid now names another process is not signalled.

    Returns the processes that had to be killed.
    """
    pinned = [p for ref in refs if (p := _Pinned.open(ref)) is not None]
    try:
        for p in pinned:
            p.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while not all(p.exited() for p in pinned) and time.monotonic() < deadline:
            time.sleep(0.05)
        killed = [p for p in pinned if not p.exited()]
        for p in killed:
            p.signal(signal.SIGKILL)
        return [p.ref for p in killed]
    finally:
        for p in pinned:
            p.close()


def stop_tree(ref: ProcessRef, timeout: float = 15.0) -> list[ProcessRef]:
    """:func:`stop_refs` on ``ref`` and everything it started, if ``ref`` still runs."""
    if not ref.current():
        return []  # its pid, and so its "children", may now belong to anyone
    children = [r for pid in descendants(ref.pid) if (r := ProcessRef.of(pid)) is not None]
    return stop_refs([ref, *children], timeout)
