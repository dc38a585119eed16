"""Context capture throughput and the safety filter's cost and quality.

- *capture*: sensor readings per second stored in the encrypted pod, from a real
  mosquitto broker (QoS 1) through the capture loop, against a bare paho subscriber
  that only counts the same messages, in the same run;
- *safety latency*: what the filter adds to a chat turn (input check, screening the
  retrieved memories and context, the output guard), from the turn's own timings over
  real turns with the built-in model, against the whole turn;
- *safety quality*: block rate on the red-team set by category and false-positive
  rate on ordinary chat of users the classifier never saw (and on look-alike benign
  requests).
"""

from __future__ import annotations

import getpass
import json
import shutil
import socket
import subprocess
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from covey._tempdirs import temporary_directory
from covey.simulations.bench._evasions import EVASIONS, disguise

__all__ = ["run"]

_PASSPHRASE = "bench passphrase, not secret"  # noqa: S105 - throwaway pods
_REDTEAM = Path(__file__).resolve().parents[2] / "tests" / "safety"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _broker(folder: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = _port()
    conf = folder / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    f"max_inflight_messages 0\nmax_queued_messages 0\nuser {getpass.getuser()}\n")
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(200):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        time.sleep(0.05)
    raise RuntimeError("mosquitto did not start")


def _publish(port: int, count: int) -> None:
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port)
    client.loop_start()
    infos = [client.publish(f"home/room{i % 50}/sensor", json.dumps({"value": i % 40 + 0.5,
                                                                     "unit": "C"}), qos=1)
             for i in range(count)]
    for info in infos:
        info.wait_for_publish(30)
    client.disconnect()
    client.loop_stop()


def _bare_rate(port: int, count: int) -> float:
    """Messages per second a subscriber that stores nothing receives."""
    import paho.mqtt.client as mqtt

    got = threading.Event()
    seen = [0]

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        seen[0] += 1
        if seen[0] >= count:
            got.set()

    subscribed = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    client.connect("127.0.0.1", port)
    client.subscribe("home/+/sensor", qos=1)
    client.loop_start()
    subscribed.wait(10)
    started = time.perf_counter()
    _publish(port, count)
    got.wait(120)
    elapsed = time.perf_counter() - started
    client.disconnect()
    client.loop_stop()
    return seen[0] / elapsed


def _capture_rate(root: Path, port: int, count: int) -> tuple[float, int]:
    from covey.device import Capture, MqttSettings, Pod, PodConfig, enable

    config = PodConfig(kdf_time_cost=1, kdf_memory_kib=8192, kdf_parallelism=1)
    with Pod.create(root / "capture", _PASSPHRASE, name="bench", config=config) as pod:
        enable(pod, "mqtt", settings=MqttSettings(port=port).to_dict())
        capture = Capture(pod)
        thread = threading.Thread(target=capture.run)
        thread.start()
        while capture.stats.broker != "connected":
            time.sleep(0.01)
        time.sleep(0.2)  # subscribed
        started = time.perf_counter()
        _publish(port, count)
        while capture.stats.stored < count and time.perf_counter() - started < 120:
            time.sleep(0.005)
        elapsed = time.perf_counter() - started
        capture.stop()
        thread.join()
        stored = int(pod.store.query("SELECT count(*) FROM context_events")[0][0])
    return stored / elapsed, stored


def _safety_latency(root: Path, turns: int) -> dict[str, Any]:
    from covey.device import Pod, PodConfig, enable, open_assistant, record_usage
    from covey.models import SamplingParams

    config = PodConfig(kdf_time_cost=1, kdf_memory_kib=8192, kdf_parallelism=1)
    messages = ["hi! how was your day?", "my sister is Ana and she lives in Porto",
                "what should I cook tonight?", "I like green tea", "tell me a joke",
                "any plans for the weekend?", "what do you remember about my sister?"]
    with Pod.create(root / "turns", _PASSPHRASE, name="bench", config=config) as pod:
        enable(pod, "routine")
        for _ in range(20):
            record_usage(pod)
        assistant = open_assistant(pod)
        session = assistant.new_session()
        params = SamplingParams(max_tokens=48, temperature=0.8, seed=1)
        safety: list[float] = []
        total: list[float] = []
        blocked: list[float] = []
        for i in range(turns):
            started = time.perf_counter()
            turn = assistant.respond(session, messages[i % len(messages)], params,
                                     to_program=i % 2 == 1)
            list(turn)
            total.append(time.perf_counter() - started)
            # A blocked turn also writes its audit entry (a durable transaction).
            (blocked if turn.explanation.safety.get("blocked") else safety).append(
                turn.timings.get("safety_s", 0.0))

    def ms(values: list[float]) -> dict[str, float]:
        if not values:
            return {}
        return {"p50": round(float(np.percentile(values, 50)) * 1000, 3),
                "p95": round(float(np.percentile(values, 95)) * 1000, 3)}

    return {"turns": turns, "safety_ms": ms(safety), "blocked_turns": len(blocked),
            "safety_ms_blocked_turns": ms(blocked), "turn_ms": ms(total)}


def _quality() -> dict[str, Any]:
    from covey.device import SafetyFilter
    from covey.models import load_corpus

    f = SafetyFilter.load()

    def blocked(where: str, text: str) -> bool:
        if where in ("memory", "context"):
            return f.check_retrieved(text).blocked
        if where == "output":
            return f.check_output(text, to_program=True).blocked
        return f.check_input(text).blocked

    rates: dict[str, list[bool]] = defaultdict(list)
    rows = [json.loads(line) for line in
            (_REDTEAM / "redteam.jsonl").read_text(encoding="utf-8").splitlines()]
    for row in rows:
        rates[row["category"]].append(blocked(row["where"], row["text"]))
    # Every typed or planted prompt again, disguised each way (evasions.py).
    plain = [r for r in rows if r["where"] != "output" and r.get("variant") != "disguised"]
    disguised = {how: round(sum(blocked(r["where"], disguise(r["text"], how)) for r in plain)
                            / len(plain), 4) for how in EVASIONS}
    hard = [json.loads(line)["text"] for line in
            (_REDTEAM / "ordinary_hard.jsonl").read_text().splitlines()]
    corpus = load_corpus()
    users = list(corpus.federated.values()) if isinstance(corpus.federated, dict) \
        else list(corpus.federated)
    chat = [e.reply for u in users for e in u.test][:3000]
    every = [x for v in rates.values() for x in v]
    return {"block_rate": round(sum(every) / len(every), 4),
            "block_rate_by_category": {k: round(sum(v) / len(v), 4) for k, v in rates.items()},
            "redteam_prompts": len(every),
            "block_rate_disguised": disguised, "disguised_prompts": len(plain),
            "false_positive_rate_chat": round(sum(f.check_input(t).blocked for t in chat)
                                              / len(chat), 4),
            "chat_messages": len(chat),
            "false_positive_rate_lookalike": round(sum(f.check_input(t).blocked for t in hard)
                                                   / len(hard), 4),
            "threshold": round(f.threshold, 4)}


def run(quick: bool = False) -> dict[str, Any]:
    """Measure capture throughput, safety latency and safety quality."""
    count = 2000 if quick else 20000
    turns = 20 if quick else 200
    with temporary_directory("covey-bench-context-") as tmp:
        root = Path(tmp)
        broker, port = _broker(root)
        try:
            bare = _bare_rate(port, count)
            stored_rate, stored = _capture_rate(root, port, count)
        finally:
            broker.terminate()
            broker.wait()
        latency = _safety_latency(root, turns)
    quality = _quality()
    results = {"capture": {"messages": count, "stored": stored,
                           "stored_per_s": round(stored_rate), "bare_subscriber_per_s":
                           round(bare), "ratio": round(stored_rate / bare, 2)},
               "safety_latency": latency, "safety_quality": quality}
    summary = [
        f"capture: {stored_rate:,.0f} readings/s stored encrypted ({stored}/{count}) against "
        f"{bare:,.0f}/s received by a bare subscriber ({stored_rate / bare:.2f}x)",
        f"safety filter per turn: p50 {latency['safety_ms']['p50']} ms, p95 "
        f"{latency['safety_ms']['p95']} ms (aim < 5 ms) of a turn's p50 "
        f"{latency['turn_ms']['p50']} ms",
        f"red team: {quality['block_rate']:.1%} of {quality['redteam_prompts']} blocked "
        f"{quality['block_rate_by_category']}; false positives "
        f"{quality['false_positive_rate_chat']:.2%} of ordinary chat, "
        f"{quality['false_positive_rate_lookalike']:.1%} of look-alike requests",
        f"red team disguised ({quality['disguised_prompts']} prompts each way): " + ", ".join(
            f"{how} {rate:.1%}" for how, rate in quality["block_rate_disguised"].items()),
    ]
    return {"config": {"messages": count, "turns": turns}, "results": results,
            "summary": summary}
