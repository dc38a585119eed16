"""`covey stop` signals only the processes covey registered, never whatever now holds
a stale pid: an unrelated process whose pid sits in a pid file survives it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from covey._processes import ProcessRef
from covey.device import Pod
from tests.conftest import FAST_CONFIG, PASSPHRASE, Covey, cli_env

# A covey part registered as the real commands register themselves, then idle.
_REGISTERED = ("import sys, time\n"
               "from pathlib import Path\n"
               "from covey.device._stop import running\n"
               "with running(Path(sys.argv[1]), 'chat'):\n"
               "    print('ready', flush=True)\n"
               "    time.sleep(120)\n")


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated process (sleep), as the one the kernel gave a dead covey's pid to."""
    process = subprocess.Popen(["sleep", "120"])
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def test_covey_stop_spares_an_unrelated_process_named_by_a_stale_pid_file(
        tmp_path: Path, covey: Covey, bystander: subprocess.Popen[bytes]) -> None:
    home = tmp_path / "pod"
    Pod.create(home, PASSPHRASE, name="p", config=FAST_CONFIG).close()
    run = home / "run"
    run.mkdir(mode=0o700)
    # A pid file left by a covey process that died (as an older covey wrote it: the pid
    # alone), and one that recorded a process started at another time: both now name
    # the bystander.
    (run / f"serve-{bystander.pid}.pid").write_text(f"{bystander.pid}\n")
    me = ProcessRef.of(os.getpid())
    assert me is not None
    reused = ProcessRef(bystander.pid, me.start, me.boot)
    (run / f"sync-{bystander.pid + 1}.pid").write_text(f"{reused}\n")
    # A SuperNode record whose pid the bystander now holds.
    (home / "supernode.json").write_text(json.dumps({"pid": bystander.pid, "process":
                                                     str(reused)}))
    # And one real covey part, which must still be stopped.
    env = cli_env(tmp_path)
    part = subprocess.Popen([sys.executable, "-c", _REGISTERED, str(home)], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert part.stdout is not None and part.stdout.readline().strip() == "ready"
        result = covey("stop", "--json", "--home", str(home), env=env)
        assert result.returncode == 0, result.stderr
        stopped = json.loads(result.stdout)
        assert stopped["processes"] == ["chat"] and stopped["supernode"] is False
        assert part.wait(timeout=10) != 0  # the registered part was signalled
    finally:
        if part.poll() is None:
            part.kill()
        part.wait()
        if part.stdout is not None:
            part.stdout.close()
    assert bystander.poll() is None  # the unrelated process still runs
    left = {p.name.split("-")[0] for p in run.iterdir()}
    assert not left & {"serve", "sync"}  # the stale files are gone


def test_a_process_ref_tells_its_process_from_a_later_one_on_the_same_pid(
        bystander: subprocess.Popen[bytes]) -> None:
    ref = ProcessRef.of(bystander.pid)
    assert ref is not None and ref.current()
    assert ProcessRef.parse(str(ref)) == ref
    assert not ProcessRef(ref.pid, ref.start + 1, ref.boot).current()
    assert not ProcessRef(ref.pid, ref.start, "another-boot").current()
    assert ProcessRef.parse(f"{bystander.pid}") is None  # a bare pid proves nothing


@pytest.mark.parametrize("pidfds", [True, False])
def test_stop_refs_signals_the_recorded_process_only(
        bystander: subprocess.Popen[bytes], pidfds: bool, monkeypatch: pytest.MonkeyPatch
        ) -> None:
    from covey._processes import stop_refs

    if not pidfds:  # an old kernel or a sandbox that forbids pidfd_open
        def forbidden(pid: int) -> int:
            raise PermissionError(1, "Operation not permitted")

        monkeypatch.setattr(os, "pidfd_open", forbidden)
    ours = subprocess.Popen(["sleep", "120"])
    try:
        ref = ProcessRef.of(ours.pid)
        stale = ProcessRef.of(bystander.pid)
        assert ref is not None and stale is not None
        stale = ProcessRef(stale.pid, stale.start - 1, stale.boot)  # started at another time
        assert stop_refs([ref, stale], timeout=5) == []  # SIGTERM was enough
        assert ours.wait(timeout=5) == -15
        assert bystander.poll() is None
    finally:
        if ours.poll() is None:
            ours.kill()
        ours.wait()


def test_leave_stops_the_recorded_supernode_and_spares_a_stale_record(
        tmp_path: Path, bystander: subprocess.Popen[bytes]) -> None:
    from covey.device.federation._join import SUPERNODE, leave, supernode

    home = tmp_path / "pod"
    home.mkdir()
    node = subprocess.Popen(["sleep", "120"])  # stands in for the SuperNode join started
    try:
        info = {"pid": node.pid, "process": str(ProcessRef.of(node.pid))}
        (home / SUPERNODE).write_text(json.dumps(info))
        assert supernode(home) == info
        assert leave(home) is True and node.wait(timeout=10) == -15
        # A record from before, whose pid the bystander now holds: not running, not stopped.
        (home / SUPERNODE).write_text(json.dumps({"pid": bystander.pid}))
        assert supernode(home) is None and leave(home) is False
        assert bystander.poll() is None
    finally:
        if node.poll() is None:
            node.kill()
        node.wait()
