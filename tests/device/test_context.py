"""Context capture against a real mosquitto broker started by the test, retention,
disabled sources, the routine source in a chat turn, DP usage statistics, and
`covey stop` halting a running sync, capture and generation."""

from __future__ import annotations

import getpass
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from covey.device import Pod
from covey.device.context._context import (
    current_context,
    enable,
    parse_reading,
    record_usage,
    sources,
    usage_histogram,
)
from covey.device.federation._budget import pod_ledger
from covey.device.federation._participation import RoundRefused, set_budget_policy, spent
from covey.privacy import USAGE_SENSITIVITY
from tests.conftest import FAST_CONFIG, PASSPHRASE, Covey, cli_env

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """A mosquitto process with a password file, on a port of its own."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, _free_port()
        self.user, self.password = "pod", "sensor-secret"
        passwords = folder / "passwords"
        passwords.write_text(f"{self.user}:{self.password}\n")
        subprocess.run(["mosquitto_passwd", "-U", str(passwords)], check=True)
        passwords.chmod(0o600)
        self.conf = folder / "mosquitto.conf"
        # ``user``: when the test runs as root, mosquitto must not drop to its own user,
        # which could not read this folder.
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous false\n"
                             f"password_file {passwords}\npersistence false\n"
                             f"user {getpass.getuser()}\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def publish(self, topic: str, payload: str | bytes) -> None:
        import paho.mqtt.publish as publish

        publish.single(topic, payload, qos=1, hostname="127.0.0.1", port=self.port,
                       auth={"username": self.user, "password": self.password})


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    if not Path(MOSQUITTO).exists():
        pytest.skip("mosquitto is not installed (make system installs it)")
    b = Broker(tmp_path)
    b.start()
    try:
        yield b
    finally:
        b.stop()


class Capturing:
    """`covey context run` for one pod home, as a separate process."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "covey", "context", "run", "--json",
                                      "--home", str(home)], env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.proc.stdout is not None
        assert json.loads(self.proc.stdout.readline()) == {"capturing": True}

    def stop(self) -> dict[str, object]:
        import signal

        self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=20)
        assert self.proc.returncode == 0, err
        return json.loads(out)


def _events(home: Path) -> list[dict[str, object]]:
    with Pod.open(home, PASSPHRASE) as pod:
        return [json.loads(r[0]) for r in pod.store.query(
            "SELECT value FROM context_events WHERE source = 'mqtt' ORDER BY id")]


def _status(home: Path, name: str = "mqtt") -> dict[str, object]:
    with Pod.open(home, PASSPHRASE) as pod:
        return next(s.to_dict() for s in sources(pod) if s.name == name)


def _wait(check: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


@pytest.fixture
def mqtt_pod(tmp_path: Path, broker: Broker, covey: Covey) -> tuple[Path, dict[str, str]]:
    home = tmp_path / "pod"
    Pod.create(home, PASSPHRASE, name="home", config=FAST_CONFIG).close()
    env = cli_env(tmp_path, BROKER_PASSWORD=broker.password)
    result = covey("context", "enable", "mqtt", "--broker", f"127.0.0.1:{broker.port}",
                   "--topic", "home/+/sensor", "--username", broker.user,
                   "--password-env", "BROKER_PASSWORD", "--home", str(home), env=env)
    assert result.returncode == 0, result.stderr
    return home, env


@pytest.mark.slow
def test_sensor_readings_arrive_encrypted_and_bad_ones_are_counted(
        mqtt_pod: tuple[Path, dict[str, str]], broker: Broker) -> None:
    home, env = mqtt_pod
    capture = Capturing(home, env)
    _wait(lambda: True)
    # Published until the capture has subscribed (it connects in the background).
    _wait(lambda: (broker.publish("home/living_room/sensor", '{"value": 21.5, "unit": "C"}'),
                   len(_events(home)) > 0)[1])
    broker.publish("home/kitchen/sensor", "19")
    broker.publish("home/garden/other", "7")  # not a subscribed pattern
    for bad in ("hello", '{"value": "warm"}', '{"temp": 3}', "NaN", "x" * 2000, b"\xff\xfe"):
        broker.publish("home/kitchen/sensor", bad)
    _wait(lambda: _status(home)["rejected"] == 6)
    stats = capture.stop()
    values = {(e["topic"], e["value"]) for e in _events(home)}
    assert ("home/kitchen/sensor", 19.0) in values
    assert ("home/living_room/sensor", 21.5) in values
    assert not any(topic == "home/garden/other" for topic, _ in values)
    assert stats["rejected"] == 6 and stats["stored"] >= 2
    # Encrypted at rest: the topic and unit are in no file of the pod in plaintext.
    for path in home.glob("pod.db*"):
        assert b"living_room" not in path.read_bytes()
    with Pod.open(home, PASSPHRASE) as pod:
        assert "living room: 21.5 C (just now)" in current_context(pod)


@pytest.mark.slow
def test_a_broker_that_returns_is_reconnected_with_its_subscription(
        mqtt_pod: tuple[Path, dict[str, str]], broker: Broker) -> None:
    home, env = mqtt_pod
    capture = Capturing(home, env)
    _wait(lambda: (broker.publish("home/hall/sensor", "1"), len(_events(home)) > 0)[1])
    broker.stop()
    time.sleep(1.0)
    broker.start()  # same port, a fresh broker: no session survives it
    _wait(lambda: (broker.publish("home/hall/sensor", "2"),
                   any(e["value"] == 2.0 for e in _events(home)))[1], timeout=30)
    stats = capture.stop()
    assert int(str(stats["connects"])) >= 2  # reconnected, and subscribed again


@pytest.mark.slow
def test_retention_deletes_expired_events_and_a_disabled_source_captures_nothing(
        mqtt_pod: tuple[Path, dict[str, str]], broker: Broker, covey: Covey) -> None:
    home, env = mqtt_pod
    assert covey("context", "enable", "mqtt", "--retention", "2s", "--broker",
                 f"127.0.0.1:{broker.port}", "--username", broker.user, "--password-env",
                 "BROKER_PASSWORD", "--home", str(home), env=env).returncode == 0
    capture = Capturing(home, env)
    _wait(lambda: (broker.publish("home/attic/sensor", "30"), len(_events(home)) > 0)[1])
    capture.stop()
    time.sleep(2.5)
    status = json.loads(covey("context", "status", "--json", "--home", str(home),
                              env=env).stdout)
    assert next(s for s in status if s["name"] == "mqtt")["events"] == 0
    with Pod.open(home, PASSPHRASE) as pod:
        erasures = [json.loads(r[0]) for r in pod.store.query(
            "SELECT detail FROM audit_log WHERE kind = 'erasure'")]
    assert any(e["table"] == "context_events" and e["by"] == "retention" for e in erasures)

    assert covey("context", "disable", "mqtt", "--home", str(home), env=env).returncode == 0
    capture = Capturing(home, env)
    for _ in range(5):
        broker.publish("home/attic/sensor", "31")
    time.sleep(1.5)
    capture.stop()
    assert _events(home) == []
    assert _status(home)["consented"] is False


def test_readings_are_validated() -> None:
    assert parse_reading("home/a/sensor", b'{"value": 3, "unit": "%"}').value == {
        "topic": "home/a/sensor", "value": 3.0, "unit": "%"}
    for bad in (b"true", b"[1]", b'{"value": 1e12}', b"Infinity", b'{"value": 1, "unit": 5}'):
        with pytest.raises(ValueError):
            parse_reading("home/a/sensor", bad)


def test_routine_usage_is_captured_only_when_enabled(pod: Pod) -> None:
    assert not record_usage(pod)  # off by default: nothing recorded
    enable(pod, "routine")
    for _ in range(12):
        assert record_usage(pod)
    lines = current_context(pod)
    assert lines and lines[0].startswith("It is ") and "often talks to you" in lines[0]
    weekday = lines[0].split()[2]  # "It is Thursday evening (...)"
    assert f"often on {weekday}s" in lines[0]


def test_usage_statistics_leave_only_under_dp_and_are_charged(pod: Pod) -> None:
    with pytest.raises(RoundRefused, match="routine"):
        usage_histogram(pod, 2.0, "stats-1")
    enable(pod, "routine")
    for _ in range(30):
        record_usage(pod)
    before = spent(pod)
    release = usage_histogram(pod, 2.0, "stats-1")
    assert len(release.hours) == 24 and release.sensitivity == USAGE_SENSITIVITY
    assert release.epsilon == pytest.approx(spent(pod)) and release.epsilon > before
    entry, = pod_ledger(pod).history()
    r = entry.release
    assert (r.kind, r.mode, r.noise_multiplier, r.clip_norm, r.rounds) == (
        "usage_histogram", "local", 2.0, USAGE_SENSITIVITY, 1)
    # the aggregator is told the epsilon of this release alone, not the user's total
    assert 0 < release.release_epsilon <= release.epsilon
    # Noisy: the true histogram has all its mass in one or two hours.
    assert sum(1 for v in release.hours if abs(v) > 0.5) >= 6
    set_budget_policy(pod, release.epsilon)  # nothing left for another release
    with pytest.raises(RoundRefused, match="privacy budget"):
        usage_histogram(pod, 2.0, "stats-2")
    assert len(pod_ledger(pod).history()) == 1


def test_usage_statistics_are_refused_while_the_pod_is_stopped(pod: Pod) -> None:
    from covey.device._stop import release, stop

    enable(pod, "routine")
    for _ in range(30):
        record_usage(pod)
    stop(pod.home)
    audited = pod.store.query("SELECT count(*) FROM audit_log")[0][0]
    # What the ClientApp's `query` handler calls: it answers with the refusal's code.
    with pytest.raises(RoundRefused) as refused:
        usage_histogram(pod, 2.0, "stats-1")
    assert refused.value.code == "stopped"
    assert pod.store.query("SELECT count(*) FROM privacy_ledger")[0][0] == 0  # nothing charged
    assert pod.store.query("SELECT count(*) FROM audit_log")[0][0] == audited  # nor sent
    release(pod.home)
    assert len(usage_histogram(pod, 2.0, "stats-1").hours) == 24


@pytest.mark.slow
def test_covey_stop_halts_a_running_sync_and_capture(tmp_path: Path, covey: Covey) -> None:
    home = tmp_path / "pod"
    Pod.create(home, PASSPHRASE, name="home", config=FAST_CONFIG).close()
    env = cli_env(tmp_path)
    sync = subprocess.Popen([sys.executable, "-m", "covey", "sync", "run", "--json",
                             "--address", "127.0.0.1", "--home", str(home)], env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert sync.stdout is not None and json.loads(sync.stdout.readline())["port"] > 0
    capture = Capturing(home, env)
    result = covey("stop", "--json", "--home", str(home), env=env)
    assert result.returncode == 0, result.stderr
    assert sorted(json.loads(result.stdout)["processes"]) == ["context", "sync"]
    assert sync.wait(timeout=10) is not None and capture.proc.wait(timeout=10) is not None
    sync.communicate()
    capture.proc.communicate()
    # Nothing starts again until released; the refusal is one line.
    refused = covey("sync", "run", "--home", str(home), env=env)
    assert refused.returncode == 11 and len(refused.stderr.strip().splitlines()) == 1
    assert "covey stop --release" in refused.stderr
    assert covey("stop", "--release", "--home", str(home), env=env).returncode == 0
    assert not (home / "STOPPED").exists()


def test_covey_stop_halts_a_running_generation(pod: Pod) -> None:
    from covey.device._stop import stop
    from covey.device.assistant._chat import open_assistant
    from covey.models import SamplingParams

    assistant = open_assistant(pod, embeddings=False)
    generated: list[str] = []
    real = assistant.generator.stream_chat

    def counted(*args: object, **kwargs: object) -> Iterator[str]:
        # A reply far longer than any the model would give: only the stop can cut it.
        for _ in range(20):
            for piece in real(*args, **kwargs):  # type: ignore[arg-type]
                generated.append(piece)
                yield piece

    assistant.generator.stream_chat = counted  # type: ignore[method-assign]
    params = SamplingParams(max_tokens=200, temperature=0.0, repetition_penalty=1.3)
    turn = assistant.respond(assistant.new_session(), "what do you like to do for fun?",
                             params)
    pieces = iter(turn)
    assert next(pieces)  # the reply is under way
    at_stop = len(generated)
    stop(pod.home)
    list(pieces)
    assert turn.timings["stopped"] == 1.0
    assert len(generated) - at_stop <= 4  # the model stopped within a few tokens


@pytest.mark.slow
def test_sensor_readings_over_tls(tmp_path: Path, covey: Covey) -> None:
    if not Path(MOSQUITTO).exists():
        pytest.skip("mosquitto is not installed (make system installs it)")
    from covey.aggregator._deploy import AggregatorHome

    certs = AggregatorHome(tmp_path / "ca")  # a CA and a server certificate for 127.0.0.1
    ca = certs.make_certs(["127.0.0.1"])
    broker = Broker(tmp_path)
    broker.conf.write_text(broker.conf.read_text() + f"cafile {ca}\ncertfile "
                           f"{certs.certs / 'server.pem'}\nkeyfile {certs.certs / 'server.key'}\n")
    broker.start()
    try:
        home = tmp_path / "pod"
        Pod.create(home, PASSPHRASE, name="home", config=FAST_CONFIG).close()
        env = cli_env(tmp_path, BROKER_PASSWORD=broker.password)
        enabled = covey("context", "enable", "mqtt", "--broker", f"127.0.0.1:{broker.port}",
                        "--username", broker.user, "--password-env", "BROKER_PASSWORD", "--tls",
                        "--ca-file", str(ca), "--home", str(home), env=env)
        assert enabled.returncode == 0, enabled.stderr
        capture = Capturing(home, env)

        def publish() -> None:
            import paho.mqtt.publish as publish

            publish.single("home/office/sensor", "42", qos=1, hostname="127.0.0.1",
                           port=broker.port, tls={"ca_certs": str(ca)},
                           auth={"username": broker.user, "password": broker.password})

        _wait(lambda: (publish(), len(_events(home)) > 0)[1])
        assert capture.stop()["connects"] == 1
        assert _events(home)[0]["value"] == 42.0
    finally:
        broker.stop()


def test_device_state_is_read_where_the_platform_exposes_it(pod: Pod, tmp_path: Path) -> None:
    from covey.device.context._context import device_readings, record

    sysfs = tmp_path / "sys"
    battery = sysfs / "power_supply" / "BAT0"
    battery.mkdir(parents=True)
    (battery / "type").write_text("Battery\n")
    (battery / "capacity").write_text("54\n")
    (battery / "status").write_text("Charging\n")
    link = sysfs / "net" / "wlan0"
    (link / "wireless").mkdir(parents=True)
    (link / "operstate").write_text("up\n")
    readings = {r.kind: r.value for r in device_readings(sysfs)}
    assert readings["battery"] == {"percent": 54, "status": "charging"}
    assert readings["network"] == {"online": True, "links": ["wifi"]}
    enable(pod, "device")
    record(pod, "device", list(device_readings(sysfs)))
    lines = current_context(pod)
    assert "battery 54% (charging)" in lines and "online" in lines


def test_bad_context_input_gets_one_clear_line(tmp_path: Path, covey: Covey) -> None:
    home = tmp_path / "pod"
    Pod.create(home, PASSPHRASE, name="home", config=FAST_CONFIG).close()
    env = cli_env(tmp_path)
    cases = [
        (("context", "enable", "weather"), "unknown context source 'weather'"),
        (("context", "enable", "routine", "--retention", "soon"), "retention 'soon'"),
        (("context", "enable", "mqtt", "--broker", "nohost"), "use HOST:PORT"),
        (("context", "enable", "mqtt", "--topic", "home/#/x"), "not an MQTT topic pattern"),
        (("context", "enable", "mqtt", "--password-env", "UNSET_VAR"), "UNSET_VAR is empty"),
        (("pod", "profile", "--timezone", "Mars/Olympus"), "unknown time zone"),
    ]
    for args, message in cases:
        result = covey(*args, "--home", str(home), env=env)
        assert result.returncode == 2, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    # Nothing was enabled by the failed attempts.
    status = json.loads(covey("context", "status", "--json", "--home", str(home),
                              env=env).stdout)
    assert not any(s["enabled"] for s in status)
