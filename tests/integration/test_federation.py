"""A real federation on the loopback: a SuperLink with TLS and SuperNode authentication,
three pods' SuperNodes, two central rounds and one local round, all through `covey`."""

from __future__ import annotations

import json
import math
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from dp_accounting import dp_event, rdp

from covey.device import Pod
from covey.device.context._context import enable, record_usage
from covey.models import load_corpus
from covey.privacy._accounting import RDP_ORDERS
from covey.simulations import seed_pods
from tests.conftest import FAST_CONFIG, PASSPHRASE, cli_env

pytestmark = pytest.mark.slow


def _free_port() -> int:
    from covey._processes import free_port

    return free_port()


def _google_rdp(segments: list[tuple[float, float, int]], delta: float) -> float:
    acc = rdp.RdpAccountant(list(RDP_ORDERS))
    for z, q, n in segments:
        event = dp_event.GaussianDpEvent(z)
        acc.compose(event if q == 1 else dp_event.PoissonSampledDpEvent(q, event), n)
    return float(acc.get_epsilon(delta))


class Federation:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.agg = tmp_path / "agg"
        self.env = cli_env(tmp_path, COVEY_EVAL_EXAMPLES="40")
        self.port = _free_port()
        self.pods: list[Path] = []

    def covey(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "covey", *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def ok(self, *args: str, timeout: float = 300) -> Any:
        result = self.covey(*args, "--json", timeout=timeout)
        assert result.returncode == 0, result.stderr + result.stdout
        return json.loads(result.stdout)

    def budget(self, pod: Path) -> dict[str, Any]:
        return dict(self.ok("pod", "budget", "--home", str(pod)))


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    fed = Federation(tmp_path)
    users = [u for u in load_corpus().federated if len(u.train) >= 20][:4]
    fed.pods = seed_pods(tmp_path, users, PASSPHRASE, config=FAST_CONFIG)
    try:
        yield fed
    finally:
        for home in fed.pods:
            fed.covey("pod", "leave", "--home", str(home))
        fed.covey("aggregator", "stop", "--home", str(fed.agg))


def test_federated_rounds_on_a_real_superlink(federation: Federation) -> None:
    fed = federation
    agg = ["--home", str(fed.agg)]
    root = fed.ok("aggregator", "certs", *agg)["root_cert"]
    status = fed.ok("aggregator", "start", *agg, "--port", str(fed.port))
    assert status["running"] and status["superlink"] == f"127.0.0.1:{fed.port}"
    superlink = status["superlink"]

    admitted, stranger = fed.pods[:3], fed.pods[3]
    for home in admitted:
        key = fed.ok("pod", "status", "--home", str(home))["federation"]["node_key"]
        fed.ok("aggregator", "admit", key, *agg)
    # a pod whose key was not registered is refused, with one clear line
    refused = fed.covey("pod", "join", "--home", str(stranger), "--superlink", superlink,
                        "--root-cert", root)
    assert refused.returncode == 9
    assert refused.stderr.strip().splitlines() == [
        refused.stderr.strip()] and "not admitted" in refused.stderr
    # the wrong root certificate, and an unreachable aggregator: clear errors
    other_ca = fed.tmp / "other"
    fed.ok("aggregator", "certs", "--home", str(other_ca))
    bad_cert = fed.covey("pod", "join", "--home", str(admitted[0]), "--superlink", superlink,
                         "--root-cert", str(other_ca / "certs" / "ca.crt"), "--aggregator-key",
                         str(fed.agg / "registry" / "signing.pub"))
    assert bad_cert.returncode == 9 and "does not verify" in bad_cert.stderr
    unreachable = fed.covey("pod", "join", "--home", str(admitted[0]), "--superlink",
                            f"127.0.0.1:{_free_port()}", "--root-cert", root)
    assert unreachable.returncode == 9 and "cannot reach" in unreachable.stderr

    for home in admitted:
        fed.ok("pod", "join", "--home", str(home), "--superlink", superlink, "--root-cert", root)
    nodes = fed.ok("aggregator", "status", *agg)["admitted"]
    assert len(nodes) == 3

    # an epsilon no noise can meet is refused before anything starts
    impossible = fed.covey("train", *agg, "--rounds", "100000", "--target-epsilon", "1e-6",
                           "--delta", "1e-9")
    assert impossible.returncode == 2 and "no noise multiplier" in impossible.stderr

    central = fed.ok("train", *agg, "--rounds", "2", "--target-epsilon", "6", "--mode",
                     "central", "--min-pods", "3", "--round-timeout", "120")
    assert central["status"] == "completed" and len(central["rounds"]) == 2
    assert all(r["accepted"] == 3 and not r["rejected"] for r in central["rounds"])
    z = central["config"]["dp"]["noise_multiplier"]
    assert central["epsilon"] <= 6.0
    assert central["epsilon"] == pytest.approx(_google_rdp([(z, 1.0, 2)], 1e-5), rel=1e-6)
    assert central["epsilon_check"]["epsilon"] <= central["epsilon"] + 0.02  # PRV is tighter
    assert central["mechanism"]["mode"] == "central"
    assert central["announced"] == {"pods": 3, "charged": 3, "refused": {}}

    local = fed.ok("train", *agg, "--rounds", "1", "--noise-multiplier", "4", "--mode",
                   "local", "--min-pods", "3")
    assert local["rounds"][0]["accepted"] == 3
    for home in admitted:
        budget = fed.budget(home)
        # the central run, charged when it was announced (before any round), then its
        # two rounds (charging nothing more), then the local release
        assert [(r["mode"], r["rounds"]) for r in budget["ledger"]] == [
            ("central", 2), ("central", 0), ("central", 0), ("local", 1)]
        # the local release at its replace-one sensitivity 2C: noise 4C is 2 sensitivities
        assert budget["epsilon_spent"] == pytest.approx(
            _google_rdp([(z, 1.0, 2), (2.0, 1.0, 1)], 1e-5), rel=1e-6)
    untouched = fed.budget(stranger)
    assert untouched["ledger"] == [] and untouched["epsilon_spent"] == 0.0

    # a pod at its budget refuses the next round; the run still completes without it
    fed.ok("pod", "budget", "--home", str(admitted[2]), "--max-epsilon",
           str(fed.budget(admitted[2])["epsilon_spent"] + 0.01))
    after = fed.ok("train", *agg, "--rounds", "1", "--noise-multiplier", "4", "--mode",
                   "local", "--min-pods", "2")
    assert after["rounds"][0]["accepted"] == 2
    assert after["rounds"][0]["refused"] == {"budget_exhausted": 1}
    assert len(fed.budget(admitted[2])["ledger"]) == 4

    status = fed.ok("aggregator", "status", *agg)
    versions = fed.ok("aggregator", "versions", *agg)
    assert status["model_version"] == versions["current"]
    metrics = httpx.get(status["metrics"], timeout=5).text
    assert "covey_rounds_total 4.0" in metrics
    assert 'covey_refused_rounds_total{reason="budget_exhausted"} 1.0' in metrics
    first = versions["versions"][0]["id"]
    assert fed.ok("aggregator", "rollback", first, *agg)["current"] == first

    # Usage statistics leave a pod only under DP, and only with its routine source on.
    for home in admitted[:2]:
        with Pod.open(home, PASSPHRASE, config=FAST_CONFIG) as pod:
            enable(pod, "routine")
            for hour in range(20):
                record_usage(pod, datetime(2026, 1, 5, 8 + hour % 3, tzinfo=UTC))
    before = [fed.budget(h)["epsilon_spent"] for h in admitted[:2]]
    usage = fed.ok("aggregator", "stats", *agg, "--noise-multiplier", "8", "--min-pods", "2")
    assert usage["answered"] == 2 and usage["refused"] == {"no_consent": 1}
    assert len(usage["mean_hours"]) == 24
    assert usage["mechanism"]["sensitivity_l2"] == pytest.approx(math.sqrt(2))
    for home, spent_before in zip(admitted[:2], before, strict=True):
        budget = fed.budget(home)
        last = budget["ledger"][-1]
        assert (last["mode"], last["noise_multiplier"]) == ("local", 8.0)
        assert last["clip_norm"] == pytest.approx(math.sqrt(2))
        assert budget["epsilon_spent"] > spent_before
    assert len(fed.budget(admitted[2])["ledger"]) == 4  # it refused: nothing charged

    # Everything the aggregator and the processes it started wrote (Flower's state.db,
    # which held every clipped update of the central rounds, run records, versions,
    # logs) is the operator's alone.
    assert (fed.agg / "state.db").exists() and list((fed.agg / "runs").glob("*.json"))
    loose = [f"{p.relative_to(fed.agg)} {stat.S_IMODE(p.lstat().st_mode):o}"
             for p in [fed.agg, *fed.agg.rglob("*")] if p.lstat().st_mode & 0o077]
    assert loose == []

    fed.ok("pod", "leave", "--home", str(admitted[0]))
    stopped = fed.ok("aggregator", "stop", *agg)["stopped"]
    assert set(stopped) == {"superlink", "metrics"}
    time.sleep(0.5)
    with pytest.raises(httpx.HTTPError):
        trust = ssl.create_default_context(cafile=root)
        httpx.get(f"https://{superlink}/health", verify=trust, timeout=2)
