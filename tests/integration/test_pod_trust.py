"""What runs on a joined pod, and who can make it run, asked as an attacker would, on a
real federation (SuperLink, Fleet gateway, SuperNodes, round agents) on this machine:

- an app submitted to the SuperLink that is not covey's signed app runs on no pod: every
  pod's SuperNode answers it with Flower's "FAB could not be verified" error and never
  starts its ClientApp, so it cannot read a pod (or leave a marker);
- covey's own signed app still trains, and while it does, no process covey started
  (SuperLink, ServerApp, round agents, SuperNodes, ClientApps) has the passphrase or the
  pod's data key in its environment or command line;
- `covey aggregator start --host 0.0.0.0` exposes the Fleet API (pods join and train
  through it) and not the Control API: `flwr` pointed at the machine's network address
  is refused, and the SuperLink itself listens on the loopback only.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from covey._processes import descendants, flower_bin, free_port
from covey.device.store._keys import WrappedKey, unwrap
from covey.models import load_corpus
from covey.simulations import seed_pods
from tests.conftest import FAST_CONFIG, PASSPHRASE, cli_env

pytestmark = [pytest.mark.slow, pytest.mark.integration]

FOREIGN_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "helpful-stats"
version = "1.0.0"
dependencies = ["flwr>=1.42,<1.43"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "mallory"

[tool.flwr.app.components]
serverapp = "foreign_app:server"
clientapp = "foreign_app:client"

[tool.flwr.app.config]
loot = ""
nodes = 3
"""

# A ClientApp that does what a malicious submitter would want: read the pod (with the
# passphrase if it can find one) and leave proof that it ran. Its ServerApp asks every
# pod and writes down what came back.
FOREIGN_APP = '''\
import json
import os
import time
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

client = ClientApp()
server = ServerApp()


@client.train()
def steal(msg, context):
    loot = Path(str(context.run_config["loot"]))
    found = {"env": {k: v for k, v in os.environ.items() if k.startswith("COVEY")},
             "node_config": {k: str(v) for k, v in context.node_config.items()}}
    try:
        from covey.device import Pod

        home = Path(str(context.node_config["pod-home"]))
        with Pod.open(home, os.environ["COVEY_PASSPHRASE"]) as pod:
            found["pod"] = pod.counts()
    except Exception as exc:
        found["pod"] = f"{type(exc).__name__}: {exc}"
    (loot / f"ran-on-{context.node_id}.json").write_text(json.dumps(found))
    return Message(RecordDict({"loot": ConfigRecord({"ok": 1})}), reply_to=msg)


@server.main()
def main(grid, context):
    loot = Path(str(context.run_config["loot"]))
    deadline = time.monotonic() + 60
    nodes = list(grid.get_node_ids())
    while len(nodes) < int(context.run_config["nodes"]) and time.monotonic() < deadline:
        time.sleep(0.5)
        nodes = list(grid.get_node_ids())
    asks = [Message(RecordDict({"ask": ConfigRecord({"x": 1})}), dst_node_id=n,
                    message_type="train") for n in nodes]
    replies = list(grid.send_and_receive(asks, timeout=90))
    (loot / "replies.json").write_text(json.dumps({
        "asked": nodes,
        "replies": [{"node": r.metadata.src_node_id,
                     "error": r.error.code if r.has_error() else None,
                     "reason": r.error.reason if r.has_error() else None}
                    for r in replies]}))
'''


def _covey(env: dict[str, str], *args: str, timeout: float = 300
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "covey", *args], env=env, timeout=timeout,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)


def _ok(env: dict[str, str], *args: str, timeout: float = 300) -> Any:
    result = _covey(env, *args, "--json", timeout=timeout)
    assert result.returncode == 0, result.stderr + result.stdout
    return json.loads(result.stdout)


def _flwr(flwr_home: Path, *args: str, timeout: float = 120
          ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVEY_")}
    env.update(FLWR_HOME=str(flwr_home), FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_TELEMETRY_ENABLED="0",
               PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")
    return subprocess.run([flower_bin("flwr"), *args], env=env, timeout=timeout,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)


def _secrets(home: Path) -> list[bytes]:
    """Every spelling of the passphrase and of the pod's data key worth looking for."""
    key = unwrap(WrappedKey.from_file(home / "pod.key"), PASSPHRASE)
    return [PASSPHRASE.encode(), key, key.hex().encode(), key.hex().upper().encode(),
            base64.b64encode(key), base64.urlsafe_b64encode(key).rstrip(b"=")]


class _Watch:
    """Reads /proc/<pid>/environ and cmdline of every process under some roots."""

    def __init__(self) -> None:
        self.seen: dict[int, tuple[bytes, bytes]] = {}
        self.unreadable: dict[int, bytes] = {}  # pid: its command line

    def sweep(self, roots: list[int]) -> None:
        for pid in {p for root in roots for p in [root, *descendants(root)]}:
            if pid in self.seen or pid in self.unreadable:
                continue
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except PermissionError:  # not dumpable, and we are not root
                self.unreadable[pid] = cmdline
            except OSError:
                continue  # it ended meanwhile
            else:
                self.seen[pid] = (environ, cmdline)

    def holding(self, secret: bytes) -> list[str]:
        return [cmd.replace(b"\0", b" ").decode(errors="replace")[:120]
                for env, cmd in self.seen.values() if secret in env or secret in cmd]


def _roots(agg: Path, pods: list[Path]) -> list[int]:
    procs = json.loads((agg / "processes.json").read_text())
    roots = [int(v["pid"]) for v in procs.values()]
    for home in pods:
        if (home / "supernode.json").exists():
            roots.append(int(json.loads((home / "supernode.json").read_text())["pid"]))
    return roots


def _pods(root: Path, n: int) -> list[Path]:
    users = [u for u in load_corpus().federated if len(u.train) >= 20][:n]
    return seed_pods(root, users, PASSPHRASE, config=FAST_CONFIG)


def _stop(root: Path, pods: list[Path]) -> None:
    env = cli_env(root)
    for home in pods:
        _covey(env, "pod", "leave", "--home", str(home))
    _covey(env, "aggregator", "stop", "--home", str(root / "agg"))


def _federate(root: Path, pods: list[Path], host: str, port: int,
              pod_address: str, cert_hosts: list[str]) -> dict[str, str]:
    env = cli_env(root, COVEY_EVAL_EXAMPLES="20")
    agg = ["--home", str(root / "agg")]
    names = [a for h in cert_hosts for a in ("--host", h)]
    ca = _ok(env, "aggregator", "certs", *agg, *names)["root_cert"]
    _ok(env, "aggregator", "start", *agg, "--host", host, "--port", str(port))
    for home in pods:
        key = _ok(env, "pod", "status", "--home", str(home))["federation"]["node_key"]
        _ok(env, "aggregator", "admit", key, *agg)
        _ok(env, "pod", "join", "--home", str(home), "--superlink", pod_address,
            "--root-cert", ca, "--aggregator-key",
            str(root / "agg" / "registry" / "signing.pub"))
    return env


class Federation:
    """An aggregator on the loopback and three joined pods, shared by a module's tests."""

    def __init__(self, root: Path) -> None:
        self.root, self.agg = root, root / "agg"
        self.pods = _pods(root, 3)
        port = free_port()
        self.env = _federate(root, self.pods, "127.0.0.1", port, f"127.0.0.1:{port}", [])


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("federation")
    fed = None
    try:
        fed = Federation(root)
        yield fed
    finally:
        _stop(root, fed.pods if fed else [])


def test_a_foreign_app_runs_on_no_pod(federation: Federation, tmp_path: Path) -> None:
    pods, agg = federation.pods, federation.agg
    # A foreign app, submitted through the Control API as `flwr run` does it.
    app, loot = tmp_path / "helpful-stats", tmp_path / "loot"
    app.mkdir()
    loot.mkdir()
    (app / "pyproject.toml").write_text(FOREIGN_PYPROJECT)
    (app / "foreign_app.py").write_text(FOREIGN_APP)
    run = _flwr(agg / "flwr", "run", str(app), "covey", "--run-config",
                f'loot="{loot}" nodes={len(pods)}', "--format", "json")
    assert run.returncode == 0, run.stderr + run.stdout
    deadline = time.monotonic() + 240
    while not (loot / "replies.json").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    report = json.loads((loot / "replies.json").read_text())
    assert len(report["asked"]) == len(pods)
    # Every pod answered, and every answer is Flower's refusal of an unverified app.
    assert sorted(r["node"] for r in report["replies"]) == sorted(report["asked"])
    assert {r["error"] for r in report["replies"]} == {7}  # ErrorCode.INVALID_FAB
    assert sorted(p.name for p in loot.iterdir()) == ["replies.json"]  # it ran nowhere
    for home in pods:  # the SuperNode refused it before any ClientApp started
        assert re.search(r"FAB (could not be verified|verification failed)",
                         (home / "logs" / "supernode.log").read_text())


def test_covey_app_trains_with_no_secret_in_any_environment(federation: Federation
                                                           ) -> None:
    pods, agg = federation.pods, federation.agg
    # covey's own app, signed by the aggregator, trains; meanwhile every process covey
    # started is read for the passphrase and the data keys.
    watch = _Watch()
    train = subprocess.Popen(
        [sys.executable, "-m", "covey", "train", "--home", str(agg), "--rounds", "1",
         "--noise-multiplier", "1", "--min-pods", str(len(pods)), "--json"],
        env=federation.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        stdin=subprocess.DEVNULL)
    while train.poll() is None:
        watch.sweep(_roots(agg, pods))
        time.sleep(0.1)
    out, err = train.communicate()
    assert train.returncode == 0, err + out
    record = json.loads(out)
    assert record["rounds"][0]["accepted"] == len(pods)
    commands = [c.replace(b"\0", b" ").decode(errors="replace") for _, c in watch.seen.values()]
    commands += [c.replace(b"\0", b" ").decode(errors="replace")
                 for c in watch.unreadable.values()]
    assert any("flwr-clientapp" in c for c in commands)  # it looked during the round
    assert any("flower-supernode" in c for c in commands)
    assert any("flower-superlink" in c for c in commands)
    for home in pods:
        for secret in _secrets(home):
            assert watch.holding(secret) == [], f"{home.name}'s secret is in a process"
    assert any("_round_agent --worker" in c for c in commands)  # the one holding the key
    # Only the round agents and their workers may hide their environment (they are not
    # dumpable: only root reads it), nothing else.
    assert all(b"covey.device.federation._round_agent" in c for c in watch.unreadable.values())


def _network_address() -> str | None:
    """An IPv4 address of this machine that is not the loopback (None: there is none)."""
    import ipaddress

    import ifaddr

    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ipaddress.ip_address(ip.ip).is_loopback:
                return ip.ip
    return None


def test_a_public_host_exposes_the_fleet_api_and_not_the_control_api(tmp_path: Path
                                                                     ) -> None:
    address = _network_address()
    if address is None:
        pytest.skip("this machine has no network address besides the loopback")
    pods = _pods(tmp_path, 2)
    try:
        _through_the_gateway(tmp_path, pods, address)
    finally:
        _stop(tmp_path, pods)


def _through_the_gateway(tmp_path: Path, pods: list[Path], address: str) -> None:
    port = free_port()
    # The certificate names the loopback too (covey's own certificates always do), so
    # that an older covey starts with it as well.
    env = _federate(tmp_path, pods, "0.0.0.0", port, f"{address}:{port}",
                    [address, "127.0.0.1"])
    agg = tmp_path / "agg"

    # The operator's own `flwr` pointed at the machine's network address: refused.
    outside = tmp_path / "outside-flwr"
    outside.mkdir()
    (outside / "config.toml").write_text(
        f'[superlink]\ndefault = "there"\n\n[superlink.there]\naddress = "{address}:{port}"\n'
        f'root-certificates = "{agg / "certs" / "ca.crt"}"\n')
    listing = json.loads(_flwr(outside, "ls", "there", "--format", "json").stdout)
    assert listing["success"] is False and "404 Not Found" in listing["error-message"]
    # ...and so is the foreign app sent there.
    app = tmp_path / "helpful-stats"
    app.mkdir()
    (app / "pyproject.toml").write_text(FOREIGN_PYPROJECT)
    (app / "foreign_app.py").write_text(FOREIGN_APP)
    run = json.loads(_flwr(outside, "run", str(app), "there", "--format", "json").stdout)
    assert run["success"] is False and "404 Not Found" in run["error-message"]
    import ssl

    import httpx

    ca = ssl.create_default_context(cafile=str(agg / "certs" / "ca.crt"))
    for path in ("/v1/control/list-runs", "/v1/control/start-run",
                 "/v1/fleet/../control/list-runs", "/docs"):
        reply = httpx.post(f"https://{address}:{port}{path}", verify=ca, content=b"",
                           timeout=10)
        assert reply.status_code == 404, (path, reply.status_code)
    # The SuperLink itself is not on the network address at all.
    control = json.loads((agg / "aggregator.json").read_text())["control"]
    link_host, link_port = control.rsplit(":", 1)
    assert link_host == "127.0.0.1"
    with pytest.raises(OSError), socket.create_connection((address, int(link_port)), 3):
        pass

    # Pods joined through the gateway, and train through it.
    record = _ok(env, "train", "--home", str(agg), "--rounds", "1", "--noise-multiplier",
                 "1", "--min-pods", "2")
    assert record["rounds"][0]["accepted"] == 2
    stopped = _ok(env, "aggregator", "stop", "--home", str(agg))["stopped"]
    assert set(stopped) == {"superlink", "gateway", "metrics"}
