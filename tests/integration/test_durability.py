"""Crashes, a full disk and concurrent writers: acknowledged writes are never lost."""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from covey.device import Pod
from covey.errors import DiskFullError
from tests.conftest import FAST_CONFIG, FAST_KDF_ENV, PASSPHRASE, Covey, cli_env

pytestmark = pytest.mark.integration

# A writer that prints the number of each memory once its commit has returned.
WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from covey.device import Pod
    start, prefix = int(sys.argv[2]), sys.argv[3]
    stop = start + int(sys.argv[5]) if len(sys.argv) > 5 else None
    with Pod.open(Path(sys.argv[1]), sys.argv[4]) as pod:
        print("ready", flush=True)
        i = start
        while stop is None or i < stop:
            pod.memories.add(f"{prefix} {i} " + "filler text " * (i % 13))
            if i % 7 == 0:
                pod.audit("egress", peer="test", nbytes=i)
            print(i, flush=True)
            i += 1
""")


def _writer(home: Path, start: int, prefix: str = "ack") -> subprocess.Popen[bytes]:
    env = {**os.environ, **FAST_KDF_ENV}
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(home), str(start), prefix, PASSPHRASE],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )


def _read_acks(proc: subprocess.Popen[bytes], seconds: float) -> list[int]:
    """Collect what the writer acknowledged for ``seconds``, then kill -9 it."""
    assert proc.stdout is not None and proc.stderr is not None
    fd = proc.stdout.fileno()
    buffer = b""
    while b"\n" not in buffer:
        ready, _, _ = select.select([fd], [], [], 60)
        chunk = os.read(fd, 65536) if ready else b""
        if not chunk:
            raise AssertionError(proc.stderr.read().decode())
        buffer += chunk
    assert buffer.startswith(b"ready\n")
    buffer = buffer[len(b"ready\n"):]
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            buffer += os.read(fd, 65536)
    # Still running means it never failed: a writer that met an error would have exited.
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    while chunk := os.read(fd, 65536):
        buffer += chunk
    proc.stdout.close()
    proc.stderr.close()
    # A line without its newline may be a number printed only in part.
    return [int(line) for line in buffer.split(b"\n")[:-1] if line.strip()]


@pytest.mark.slow
def test_kill_9_loses_no_acknowledged_write(pod: Pod) -> None:
    pod.close()
    rng = random.Random(7)
    acknowledged: list[int] = []
    start = 0
    for _ in range(30):
        acks = _read_acks(_writer(pod.home, start), rng.uniform(0.05, 0.6))
        acknowledged += acks
        start = (acks[-1] + 1) if acks else start
        # A following start may reuse a number whose commit was cut: text is keyed by it.
    assert len(acknowledged) > 100
    with Pod.open(pod.home, PASSPHRASE) as again:
        assert again.store.integrity_errors() == []
        assert again.verify_audit_chain().ok
        texts = {m.text.split()[1] for m in again.memories.all() if m.text.startswith("ack")}
    missing = [i for i in acknowledged if str(i) not in texts]
    assert missing == []


def test_concurrent_writers_wait_instead_of_failing(pod: Pod) -> None:
    """Three processes write 150 memories each at once: all finish, nothing is lost.

    SQLite's busy handler does not promise fairness, so a writer may wait while another
    runs; what it must never do is fail.
    """
    pod.close()
    env = {**os.environ, **FAST_KDF_ENV}
    procs = [subprocess.Popen(
        [sys.executable, "-c", WRITER, str(pod.home), "0", f"w{n}", PASSPHRASE, "150"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env) for n in range(3)]
    errors = [p.communicate(timeout=120)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    with Pod.open(pod.home, PASSPHRASE) as again:
        for n in range(3):
            stored = {m.text.split()[1] for m in again.memories.all()
                      if m.text.startswith(f"w{n} ")}
            assert stored == {str(i) for i in range(150)}
        assert again.verify_audit_chain().ok


def test_cli_and_api_on_one_pod_at_once(pod: Pod, covey: Covey, tmp_path: Path) -> None:
    pod.close()
    writer = _writer(pod.home, 0, prefix="bg")
    adds = [covey("memory", "add", f"cli note {i}", "--home", str(pod.home),
                  env=cli_env(tmp_path)) for i in range(5)]
    acks = _read_acks(writer, 0.5)
    assert [a.returncode for a in adds] == [0] * 5, [a.stderr for a in adds]
    with Pod.open(pod.home, PASSPHRASE) as again:
        texts = {m.text for m in again.memories.all()}
    assert {f"cli note {i}" for i in range(5)} <= texts
    assert len([t for t in texts if t.startswith("bg ")]) >= len(acks)


@pytest.fixture
def small_disk(tmp_path: Path):
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_keeps_acknowledged_writes(small_disk: Path, covey: Covey,
                                             tmp_path: Path) -> None:
    home = small_disk / "pod"
    acknowledged: list[str] = []
    with Pod.create(home, PASSPHRASE, config=FAST_CONFIG) as pod:
        with pytest.raises(DiskFullError):
            for i in range(100_000):
                text = f"note {i} " + "lorem ipsum dolor " * 19 + "end"
                pod.memories.add(text)
                acknowledged.append(text)
        assert len(acknowledged) > 20
        # The pod stays usable for reads while the disk is full.
        assert pod.memories.count() == len(acknowledged)
    result = covey("memory", "add", "one more", "--home", str(home), env=cli_env(tmp_path))
    assert result.returncode == 7, result.stderr
    assert result.stderr.startswith("error: the disk holding") and "full" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    with Pod.open(home, PASSPHRASE) as pod:
        assert pod.store.integrity_errors() == []
        assert [m.text for m in reversed(pod.memories.all())] == acknowledged
        pod.memories.add("after space was freed")
