"""Sync between one user's pods: pairing and the sync loop as separate `covey` processes
on the loopback (real zeroconf, real TCP, real SQLCipher stores).

Each pod's loop is `covey sync run`; edits are made with the real commands (`covey pod
budget`, `covey pod consent`, `covey memory forget`) in further processes, and the test
reads the stores directly to see when the edit arrived.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from covey.device import Pod
from covey.device.federation._participation import budget_policy
from covey.device.memory._graph import PreferenceGraph
from covey.device.memory._profile import get_profile
from covey.device.sync._sync import PodState
from tests.conftest import FAST_CONFIG, PASSPHRASE, Covey, cli_env

pytestmark = pytest.mark.slow

LOOPBACK = "127.0.0.1"


class Pods:
    """Pod homes, their `covey sync run` processes, and the `covey` command."""

    def __init__(self, tmp_path: Path, covey: Covey) -> None:
        self.tmp, self.covey = tmp_path, covey
        self.env = cli_env(tmp_path)
        self.loops: dict[str, subprocess.Popen[str]] = {}

    def home(self, name: str) -> Path:
        return self.tmp / name

    def create(self, *names: str) -> None:
        for name in names:
            Pod.create(self.home(name), PASSPHRASE, name=name, config=FAST_CONFIG).close()

    def run(self, name: str, *args: str) -> subprocess.CompletedProcess[str]:
        result = self.covey(*args, "--home", str(self.home(name)), env=self.env)
        assert result.returncode == 0, result.stderr
        return result

    def pairing(self, names: tuple[str, ...], *extra: str,
                typing: Callable[[list[str]], list[str]] | None = None
                ) -> list[tuple[int, str, str]]:
        """Run `covey sync pair` on each pod at once, as a person at the devices would:
        read the code each one shows and type on each the code the other shows (or what
        ``typing(codes)`` says). Each process's (exit code, stdout, stderr)."""
        cmd = ["sync", "pair", "--json", "--address", LOOPBACK, "--timeout", "30", *extra]
        procs = [subprocess.Popen([sys.executable, "-m", "covey", *cmd, "--home",
                                   str(self.home(n))], env=self.env, text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE) for n in names]
        codes: dict[int, str] = {}
        errors: dict[int, list[str]] = {i: [] for i in range(len(procs))}

        def watch(i: int, proc: subprocess.Popen[str]) -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                errors[i].append(line)
                if line.startswith("pairing code:"):
                    codes[i] = line.split(":", 1)[1].strip()

        readers = [threading.Thread(target=watch, args=(i, p), daemon=True)
                   for i, p in enumerate(procs)]
        for t in readers:
            t.start()
        deadline = time.monotonic() + 45
        while len(codes) < len(procs) and time.monotonic() < deadline and \
                any(p.poll() is None for p in procs):
            time.sleep(0.05)
        if len(codes) == len(procs):  # what the person reads, and types
            shown = [codes[i] for i in range(len(procs))]
            typed = typing(shown) if typing else list(reversed(shown))
            for proc, text in zip(procs, typed, strict=True):
                assert proc.stdin is not None
                proc.stdin.write(text + "\n")
                proc.stdin.flush()
        results = []
        for i, proc in enumerate(procs):
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.close()
            out = proc.stdout.read()  # stderr is the reader thread's alone
            proc.wait(timeout=60)
            readers[i].join(10)
            results.append((proc.returncode, out, "".join(errors[i])))
        return results

    def pair(self, a: str, b: str) -> list[dict[str, object]]:
        results = self.pairing((a, b))
        assert all(code == 0 for code, _, _ in results), [err for _, _, err in results]
        return [json.loads(out) for _, out, _ in results]

    def start(self, name: str) -> None:
        proc = subprocess.Popen(
            [sys.executable, "-m", "covey", "sync", "run", "--json", "--address", LOOPBACK,
             "--home", str(self.home(name))], env=self.env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = proc.stdout.readline() if proc.stdout else ""
        assert json.loads(line)["port"] > 0, proc.stderr.read() if proc.stderr else ""
        self.loops[name] = proc

    def stop(self, name: str) -> None:
        proc = self.loops.pop(name)
        proc.send_signal(signal.SIGINT)  # Ctrl-C, which both `sync run` and `serve` obey
        proc.wait(timeout=20)
        assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""

    def stop_all(self) -> None:
        for name in list(self.loops):
            self.stop(name)

    def read(self, name: str, what: Callable[[Pod], object]) -> object:
        with Pod.open(self.home(name), PASSPHRASE) as pod:
            return what(pod)

    def wait_for(self, names: tuple[str, ...], what: Callable[[Pod], object],
                 expected: object, timeout: float = 20.0) -> float:
        """Seconds until every pod in ``names`` shows ``expected``."""
        started = time.monotonic()
        pending = set(names)
        while pending and time.monotonic() - started < timeout:
            pending = {n for n in pending if self.read(n, what) != expected}
            if pending:
                time.sleep(0.05)
        assert not pending, {n: self.read(n, what) for n in pending}
        return time.monotonic() - started


def max_epsilon(pod: Pod) -> float:
    return budget_policy(pod).max_epsilon


def consents(pod: Pod) -> dict[str, bool]:
    return {r[0]: bool(r[1]) for r in pod.store.query("SELECT scope, granted FROM consents")}


def memories(pod: Pod) -> list[str]:
    return sorted(m.text for m in pod.memories.all())


def audit(pod: Pod, kind: str) -> list[dict[str, object]]:
    return [{"peer": r["peer"], **json.loads(r["detail"])} for r in pod.store.query(
        "SELECT peer, detail FROM audit_log WHERE kind = ? ORDER BY seq", (kind,))]


@pytest.fixture
def pods(tmp_path: Path, covey: Covey) -> Iterator[Pods]:
    group = Pods(tmp_path, covey)
    try:
        yield group
    finally:
        for proc in group.loops.values():
            proc.kill()
            proc.wait()


@pytest.fixture
def trio(pods: Pods) -> Pods:
    """Phone, laptop and speaker: created, paired through the phone, loops running."""
    pods.create("phone", "laptop", "speaker")
    first = pods.pair("phone", "laptop")
    assert all(len(str(r["sas"])) == 6 for r in first)
    assert {r["role"] for r in first} == {"sponsor", "joined"}
    pods.pair("speaker", "phone")
    for name in ("phone", "laptop", "speaker"):
        pods.start(name)
    return pods


def test_three_pods_pair_and_an_edit_reaches_the_others(trio: Pods) -> None:
    users = {trio.read(n, lambda p: PodState(p).user_key().user_id)  # type: ignore[union-attr]
             for n in ("phone", "laptop", "speaker")}
    assert len(users) == 1  # one user identity on every pod
    # The laptop learns of the speaker (paired through the phone) from the phone.
    trio.wait_for(("laptop", "speaker"), lambda p: len(PodState(p).devices()), 3)

    trio.run("phone", "pod", "budget", "--max-epsilon", "3.5")
    trio.wait_for(("laptop", "speaker"), max_epsilon, 3.5)
    trio.run("speaker", "pod", "consent", "federated_training", "--grant")
    trio.wait_for(("phone", "laptop"), consents, {"federated_training": True})
    trio.run("laptop", "pod", "profile", "--name", "Sam", "--timezone", "Europe/Lisbon")
    profile = {"name": "Sam", "timezone": "Europe/Lisbon"}
    trio.wait_for(("phone", "speaker"), get_profile, profile)

    # Each sync is in the audit log: peer, bytes, kinds of data, no content.
    synced = trio.read("laptop", lambda p: audit(p, "sync"))
    assert isinstance(synced, list)
    budget_syncs = [s for s in synced if s["collections"] == ["budget_policy"]]
    assert budget_syncs and all(int(str(s["bytes_in"])) > 0 for s in budget_syncs)
    assert "3.5" not in json.dumps(synced)


def test_forgetting_a_shared_memory_forgets_it_on_every_pod(trio: Pods) -> None:
    trio.run("laptop", "pod", "consent", "sync_memories", "--grant")
    trio.wait_for(("phone", "speaker"), lambda p: consents(p).get("sync_memories"), True)
    text = "the spare key is under the blue flowerpot"
    trio.run("laptop", "memory", "add", text, "--kind", "fact")
    trio.wait_for(("phone", "speaker"), memories, [text])

    listed = json.loads(trio.run("phone", "memory", "list", "--json").stdout)
    trio.run("phone", "memory", "forget", str(listed[0]["id"]))
    trio.wait_for(("laptop", "speaker"), memories, [])
    # Forgotten for good: a later sync does not bring it back from a pod that had it.
    time.sleep(1.0)
    assert trio.read("laptop", memories) == trio.read("speaker", memories) == []
    erasures = trio.read("speaker", lambda p: audit(p, "erasure"))
    assert erasures == [{"peer": "", "table": "memories", "rows": 1, "by": "sync"}]


def test_preferences_follow_the_newer_fact_on_every_pod(trio: Pods) -> None:
    def graph(pod: Pod) -> dict[str, str]:
        return {f.relation: f.value for f in PreferenceGraph(pod.store).current()}

    with Pod.open(trio.home("phone"), PASSPHRASE) as pod:  # what chat does with a fact
        from covey.device.assistant._facts import extract_facts

        for fact in extract_facts("My sister is Ana. I like green tea."):
            with pod.store.transaction() as c:
                PreferenceGraph(pod.store).assert_fact(c, fact, {"source": "chat"})
    trio.wait_for(("laptop", "speaker"), graph, {"sister": "Ana", "likes": "green tea"})
    with Pod.open(trio.home("speaker"), PASSPHRASE) as pod:
        for fact in extract_facts("My sister is Rita. I dislike green tea."):
            with pod.store.transaction() as c:
                PreferenceGraph(pod.store).assert_fact(c, fact, {"source": "chat"})
    trio.wait_for(("phone", "laptop"), graph, {"sister": "Rita", "dislikes": "green tea"})


def test_a_partition_heals_and_all_converge(trio: Pods) -> None:
    trio.wait_for(("laptop", "speaker"), lambda p: len(PodState(p).devices()), 3)
    trio.stop("speaker")
    trio.run("phone", "pod", "budget", "--max-epsilon", "2")
    trio.run("speaker", "pod", "consent", "analytics", "--revoke")
    trio.run("laptop", "pod", "consent", "federated_training", "--grant")
    trio.wait_for(("laptop",), max_epsilon, 2.0)
    time.sleep(0.5)
    assert trio.read("speaker", max_epsilon) != 2.0  # it was away
    trio.start("speaker")
    everything = {"analytics": False, "federated_training": True}
    trio.wait_for(("phone", "laptop", "speaker"), consents, everything)
    trio.wait_for(("phone", "laptop", "speaker"), max_epsilon, 2.0)


def test_an_unpaired_pod_sees_the_others_but_receives_nothing(trio: Pods) -> None:
    trio.run("phone", "pod", "budget", "--max-epsilon", "4")
    trio.create("stranger")
    trio.start("stranger")
    stranger = trio.read("stranger", lambda p: p.identity.device_id)
    # The stranger tries the others (it discovered them) and they refuse it.
    trio.wait_for(("phone",), lambda p: any(r["peer"] == stranger and "not a paired device"
                                            in str(r["reason"]) for r in
                                            audit(p, "sync.refused")), True)
    assert trio.read("stranger", lambda p: PodState(p).summary()) == {}
    assert trio.read("stranger", lambda p: budget_policy(p).max_epsilon) == 10.0


def _user_key(pod: Pod) -> bytes:
    key = PodState(pod).user_key()
    assert key is not None
    return key.public_key


def test_a_revoked_device_is_refused_and_told_why(trio: Pods) -> None:
    trio.wait_for(("laptop", "speaker"), lambda p: len(PodState(p).devices()), 3)
    user_id = json.loads(trio.run("laptop", "sync", "status", "--json").stdout)["user_id"]
    old_key = trio.read("phone", _user_key)
    trio.run("phone", "sync", "revoke", "speaker", "--reason", "lost in a taxi")
    trio.wait_for(("laptop",), lambda p: sum(bool(d.revoked) for d in PodState(p).devices()), 1)
    # The user key was replaced; the laptop got the new one, the speaker never does.
    new_key = trio.read("phone", _user_key)
    assert new_key != old_key
    trio.wait_for(("laptop",), _user_key, new_key)
    status = json.loads(trio.run("laptop", "sync", "status", "--json").stdout)
    assert status["user_id"] == user_id and status["user_key"] == "current"
    trio.run("phone", "pod", "budget", "--max-epsilon", "1.5")
    trio.wait_for(("laptop",), max_epsilon, 1.5)

    def told(pod: Pod) -> bool:
        return any("revoked by its user" in str(r["reason"]) and "lost in a taxi"
                   in str(r["reason"]) for r in audit(pod, "sync.refused"))

    trio.wait_for(("speaker",), told, True)
    time.sleep(1.0)
    assert trio.read("speaker", max_epsilon) != 1.5
    assert trio.read("speaker", _user_key) == old_key


def test_covey_serve_syncs_in_the_background(pods: Pods) -> None:
    pods.create("laptop", "phone")
    pods.pair("laptop", "phone")
    serve = subprocess.Popen(
        [sys.executable, "-m", "covey", "serve", "--port", "0", "--json", "--sync-address",
         LOOPBACK, "--home", str(pods.home("laptop"))], env=pods.env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pods.loops["laptop"] = serve  # stopped like the others
    assert serve.stdout is not None
    assert json.loads(serve.stdout.readline())["sync_port"] > 0
    pods.start("phone")
    pods.run("phone", "pod", "budget", "--max-epsilon", "6")
    pods.wait_for(("laptop",), max_epsilon, 6.0)
    pods.run("laptop", "pod", "consent", "federated_training", "--grant")
    pods.wait_for(("phone",), consents, {"federated_training": True})
    pods.stop("laptop")


def test_pairing_and_revoking_fail_with_one_clear_line(pods: Pods) -> None:
    pods.create("alone")
    lonely = pods.covey("sync", "pair", "--address", LOOPBACK, "--timeout", "2",
                        "--home", str(pods.home("alone")), env=pods.env)
    assert lonely.returncode == 3
    assert lonely.stderr.strip().endswith("no other device in pairing mode answered within 2 s")
    unpaired = pods.covey("sync", "revoke", "dev-0000000000", "--home", str(pods.home("alone")),
                          env=pods.env)
    assert unpaired.returncode == 2 and len(unpaired.stderr.strip().splitlines()) == 1
    assert "not paired" in unpaired.stderr
    status = json.loads(pods.run("alone", "sync", "status", "--json").stdout)
    assert status["user_id"] is None and status["devices"] == 0


_NETNS_SCRIPT = r"""
set -eu
ip link set lo up
unshare --net sleep 600 &
CHILD=$!
sleep 0.3
ip link add veth0 type veth peer name veth1
ip link set veth1 netns "$CHILD"
ip addr add 10.77.0.1/24 dev veth0
ip link set veth0 up
nsenter -t "$CHILD" -n sh -c 'ip link set lo up && ip addr add 10.77.0.2/24 dev veth1 &&
                              ip link set veth1 up'
covey() { "$PY" -m covey "$@"; }
# The person: read the code each device shows, type it on the other.
mkfifo "$OUT/in-a" "$OUT/in-b"
covey sync pair --json --address 10.77.0.1 --timeout 30 --home "$A" \
    < "$OUT/in-a" > "$OUT/pair-a" 2> "$OUT/err-a" &
PAIR=$!
nsenter -t "$CHILD" -n "$PY" -m covey sync pair --json --address 10.77.0.2 --timeout 30 \
    --home "$B" < "$OUT/in-b" > "$OUT/pair-b" 2> "$OUT/err-b" &
PAIRB=$!
exec 3> "$OUT/in-a" 4> "$OUT/in-b"
code() { for _ in $(seq 300); do
           c=$(sed -n 's/^pairing code: //p' "$1"); [ -n "$c" ] && { echo "$c"; return; }
           sleep 0.1; done; }
CA=$(code "$OUT/err-a"); CB=$(code "$OUT/err-b")
echo "$CB" >&3; echo "$CA" >&4
wait "$PAIR"; wait "$PAIRB"
exec 3>&- 4>&-
covey sync run --address 10.77.0.1 --home "$A" > /dev/null &
nsenter -t "$CHILD" -n "$PY" -m covey sync run --address 10.77.0.2 --home "$B" > /dev/null &
echo ready
wait
"""


def _namespaces_unavailable() -> str:
    import shutil

    for tool in ("unshare", "nsenter", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--net", "ip", "link", "add",
                            "v0", "type", "veth", "peer", "name", "v1"],
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"network namespaces are not available here: {probe.stderr.strip()[:120]}"
    return ""


def test_two_pods_in_separate_network_namespaces_pair_and_sync(pods: Pods) -> None:
    reason = _namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    import os

    pods.create("a", "b")
    out = pods.tmp / "netns"
    out.mkdir()
    env = {**pods.env, "PY": sys.executable, "A": str(pods.home("a")),
           "B": str(pods.home("b")), "OUT": str(out)}
    script = subprocess.Popen(
        ["unshare", "--user", "--map-root-user", "--net", "bash", "-c", _NETNS_SCRIPT],
        env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True)
    try:
        assert script.stdout is not None
        assert script.stdout.readline().strip() == "ready", script.stderr.read()  # type: ignore[union-attr]
        paired = [json.loads((out / f"pair-{n}").read_text()) for n in "ab"]
        assert paired[0]["user_id"] == paired[1]["user_id"]
        pods.run("a", "pod", "budget", "--max-epsilon", "2.5")
        pods.wait_for(("b",), max_epsilon, 2.5)  # latency: make bench (sync)
    finally:
        os.killpg(script.pid, signal.SIGINT)
        try:
            script.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(script.pid, signal.SIGKILL)
            script.wait()


def test_no_command_line_skips_the_codes(pods: Pods) -> None:
    """`covey sync pair --yes` (the README's first example once) pairs nothing, and nor
    does a pairing where nobody types the codes."""
    pods.create("a", "b")
    for extra, stdin in ((["--yes"], subprocess.DEVNULL), ([], subprocess.DEVNULL)):
        cmd = ["sync", "pair", "--json", "--address", LOOPBACK, "--timeout", "20", *extra]
        procs = [subprocess.Popen([sys.executable, "-m", "covey", *cmd, "--home",
                                   str(pods.home(n))], env=pods.env, text=True, stdin=stdin,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for n in ("a", "b")]
        results = [p.communicate(timeout=60) for p in procs]
        assert all(p.returncode != 0 for p in procs), results
        assert all(len(err.strip().splitlines()) >= 1 for _, err in results)
        if not extra:
            assert all("pairing needs the code the other device shows" in err
                       for _, err in results), results
        # Nothing is trusted: neither pod holds a user key.
        for name in ("a", "b"):
            assert pods.read(name, lambda p: PodState(p).user_key()) is None


def test_a_wrong_code_typed_on_either_device_pairs_nothing(pods: Pods) -> None:
    pods.create("a", "b")
    for wrong in (0, 1):
        def typing(shown: list[str], wrong: int = wrong) -> list[str]:
            typed = list(reversed(shown))
            typed[wrong] = f"{(int(typed[wrong].replace(' ', '')) + 1) % 1_000_000:06d}"
            return typed

        results = pods.pairing(("a", "b"), typing=typing)
        assert all(code == 3 for code, _, _ in results), results
        assert "the code typed here is not the one" in results[wrong][2]
        for name in ("a", "b"):
            assert pods.read(name, lambda p: PodState(p).user_key()) is None


def test_a_pod_with_a_user_key_never_takes_another(pods: Pods) -> None:
    pods.create("a", "b", "c", "d")
    pods.pair("a", "b")
    pods.pair("c", "d")
    before = {n: pods.read(n, lambda p: PodState(p).user_key().user_id)  # type: ignore[union-attr]
              for n in ("a", "c")}
    assert before["a"] != before["c"]
    results = pods.pairing(("a", "c"))
    assert all(code == 3 for code, _, _ in results), results
    assert all("both devices already belong to a user" in err for _, _, err in results)
    for name in ("a", "c"):
        key = pods.read(name, lambda p: PodState(p).user_key())
        assert key is not None and key.user_id == before[name]  # type: ignore[attr-defined]
