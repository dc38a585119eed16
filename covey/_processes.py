"""Processes covey starts and stops: Flower's SuperLink and SuperNodes, helpers' servers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["SECRET_ENV", "alive", "child_env", "descendants", "flower_bin", "flower_env",
           "free_port", "secret_from_env", "stop_process", "stop_processes", "take_secrets"]

# Read by the CLI for non-interactive use, and never handed on: a process covey starts
# gets what it needs another way (the round agent's data key comes down a pipe).
SECRET_ENV = ("COVEY_PASSPHRASE", "COVEY_NEW_PASSPHRASE")
_taken: dict[str, str] = {}


def take_secrets() -> None:
    """Move ``SECRET_ENV`` out of ``os.environ``, so that no child process inherits them
    whoever starts it (the `covey` command does this first)."""
    _taken.clear()
    for name in SECRET_ENV:
        if name in os.environ:
            _taken[name] = os.environ.pop(name)


def secret_from_env(name: str) -> str | None:
    """A secret the environment gave this process (taken or still there)."""
    return _taken.get(name, os.environ.get(name))


def flower_bin(name: str) -> str:
    """The path of a command installed beside this Python (flwr, flower-superlink, ...)."""
    return str(Path(sys.executable).with_name(name))


def child_env() -> dict[str, str]:
    """This process's environment without the secrets in ``SECRET_ENV``."""
    return {k: v for k, v in os.environ.items() if k not in SECRET_ENV}


def flower_env(flwr_home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower processes: our venv first, no network checks, no
    secrets."""
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
