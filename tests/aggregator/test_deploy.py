"""The aggregator's processes: `covey aggregator stop` signals only the processes it
started (a recorded pid that now names someone else's process is left alone); a running
aggregator keeps its home owner-only and Flower's APIs on the loopback, whatever Flower
settings the operator's environment carries."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from covey._processes import ProcessRef, alive, child_env, descendants, flower_env, free_port
from covey.aggregator._deploy import AggregatorHome
from tests.conftest import cli_env


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


def _address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as /proc/net/tcp{,6} writes it (32-bit words in host byte order)."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(words)
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


def _listening(pids: list[int]) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket listening in one of ``pids``."""
    listen: dict[str, tuple[str, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                host, port = fields[1].split(":")
                listen[fields[9]] = (str(_address(host)), int(port, 16))
    found = []
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in listen:
                    found.append(listen[target[8:-1]])
    return found


@pytest.mark.slow
@pytest.mark.integration
def test_a_running_aggregator_keeps_its_home_private_and_flower_on_the_loopback(
        tmp_path: Path, covey) -> None:
    # Settings an operator's shell might carry: each would open a Flower API on 0.0.0.0.
    env = cli_env(tmp_path, FLWR_INTERNAL_GRPC_CONTROL_API="1",
                  FLWR_INTERNAL_GRPC_FLEET_API="1")
    home = tmp_path / "agg"
    assert covey("aggregator", "certs", "--home", str(home), env=env).returncode == 0
    started = covey("aggregator", "start", "--home", str(home), "--port", str(free_port()),
                    "--json", env=env)
    try:
        assert started.returncode == 0, started.stderr
        link = json.loads(started.stdout)["pids"]["superlink"]
        tree = [link, *descendants(link)]
        sockets = _listening(tree)
        assert sockets  # the SuperLink's one HTTPS port at least
        assert all(ipaddress.ip_address(a).is_loopback for a, _ in sockets), sockets
        for pid in tree:
            assert b"FLWR_INTERNAL_" not in Path(f"/proc/{pid}/environ").read_bytes()
        assert (home / "state.db").exists()  # where Flower keeps what it relays
        loose = [f"{p.relative_to(tmp_path)} {stat.S_IMODE(p.lstat().st_mode):o}"
                 for p in [home, *home.rglob("*")] if p.lstat().st_mode & 0o077]
        assert loose == []
    finally:
        covey("aggregator", "stop", "--home", str(home), env=env)


def test_flower_processes_get_no_inherited_flower_settings(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FLWR_INTERNAL_GRPC_CONTROL_API", "1")
    monkeypatch.setenv("FLWR_SUPERGRID_API_URL", "http://example.org")
    monkeypatch.setenv("FLWR_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("COVEY_PASSPHRASE", "not for children")
    for env in (child_env(), flower_env(tmp_path)):
        assert not [k for k in env if k.startswith("FLWR_INTERNAL_")]
        assert "COVEY_PASSPHRASE" not in env and env["FLWR_LOG_LEVEL"] == "DEBUG"
        assert env.get("FLWR_SUPERGRID_API_URL") != "http://example.org"
