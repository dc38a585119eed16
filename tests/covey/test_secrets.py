"""A passphrase given in the environment does not stay readable in a running covey's
environment: an attacker reading /proc/<pid>/environ of a long-running `covey` finds
nothing (the kernel keeps the block a process was started with, whatever os.environ
says afterwards)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PASSPHRASE, cli_env

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")


def _environ_of(pid: int) -> bytes:
    """What another process of the same user reads (nothing when it is refused)."""
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except PermissionError:  # not dumpable, and we are not root: nothing to read
        return b""


def test_a_running_sync_loop_holds_no_passphrase_in_its_environment(tmp_path: Path,
                                                                   covey) -> None:
    home = tmp_path / "pod"
    env = cli_env(tmp_path)
    assert covey("pod", "init", "--home", str(home), "--json", env=env).returncode == 0
    loop = subprocess.Popen(
        [sys.executable, "-m", "covey", "sync", "run", "--home", str(home), "--address",
         "127.0.0.1", "--json"], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    try:
        ready = loop.stdout.readline() if loop.stdout else b""
        assert json.loads(ready)["port"] > 0, loop.stderr.read() if loop.stderr else ""
        environ = _environ_of(loop.pid)  # it unlocked the pod with the passphrase
        assert PASSPHRASE.encode() not in environ
        assert b"COVEY_PASSPHRASE" not in environ
        if environ:  # the rest of the block is untouched
            assert f"TMPDIR={env['TMPDIR']}".encode() in environ.split(b"\0")
    finally:
        loop.terminate()
        loop.wait(timeout=30)


_PROBE = """
import ctypes, json, subprocess
from pathlib import Path
from covey._processes import secret_from_env, take_secrets
take_secrets()
try:
    own = Path("/proc/self/environ").read_bytes()
except PermissionError:  # not dumpable and not root: read the range the kernel shows
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    start, end = int(fields[47]), int(fields[48])
    own = ctypes.string_at(start, end - start)
child = subprocess.run(["env"], capture_output=True).stdout
print(json.dumps({"secret": secret_from_env("COVEY_PASSPHRASE"),
                  "dumpable": ctypes.CDLL(None).prctl(3, 0, 0, 0, 0),
                  "in_block": b"COVEY_PASSPHRASE" in own or b"horse" in own,
                  "in_child": b"COVEY_PASSPHRASE" in child,
                  "kept": b"KEPT=yes" in own.split(b"\\0")}))
"""


def test_taken_secrets_leave_the_environment_block_and_the_process_is_not_dumpable(
        tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE], env=cli_env(tmp_path, KEPT="yes"),
                         capture_output=True, text=True, check=True).stdout
    # covey itself still has it; PR_GET_DUMPABLE says 0; it is gone from the block the
    # kernel shows and from children; the other variables are kept
    assert json.loads(out) == {"secret": PASSPHRASE, "dumpable": 0, "in_block": False,
                               "in_child": False, "kept": True}
