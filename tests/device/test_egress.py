"""Prompts sent to a model server through the `openai` generator: every request is
audited (host, the exact bytes the server received, the kinds of data the prompt held),
the pod report lists it, and a server off the loopback gets nothing without consent.

The peer is a real HTTP server speaking the OpenAI streaming API (a stub: it is not what
is under test), bound on the loopback or on an address of this machine that is not.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from covey.device import Pod
from covey.device._pod_audit import pod_audit
from covey.device.assistant._chat import open_assistant
from covey.device.assistant._egress import RemoteConsentError, is_consent_scope, is_loopback
from covey.device.assistant._feedback import set_consent
from covey.device.store._audit import AuditEntry, entries
from covey.privacy import pod_report
from tests.conftest import FAST_CONFIG, PASSPHRASE, Covey, cli_env
from tests.device._lan import lan_address

MESSAGE = "what should I cook for my sister tonight?"


@dataclass
class Received:
    """What the model server got: one entry per request."""

    requests: list[dict[str, Any]] = field(default_factory=list)


@contextmanager
def model_server(host: str) -> Iterator[tuple[str, Received]]:
    """An OpenAI-compatible server on ``host`` (any free port) that records each request
    as it arrived (path, Content-Length, the raw body) and streams a short reply."""
    received = Received()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            return

        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            body = self.rfile.read(length)
            received.requests.append({"path": self.path, "length": length, "body": body})
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for i, piece in enumerate(["Try ", "a ", "curry."]):
                choice = {"delta": {"content": piece},
                          "finish_reason": "stop" if i == 2 else None}
                self.wfile.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")

    httpd = ThreadingHTTPServer((host, 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{httpd.server_address[1]}", received
    finally:
        httpd.shutdown()
        httpd.server_close()


def _remember(pod: Pod) -> None:
    """A pod with a preference and a memory that a prompt about cooking recalls."""
    from covey.device.assistant._facts import extract_facts
    from covey.device.memory._graph import PreferenceGraph

    graph = PreferenceGraph(pod.store)
    with pod.store.transaction() as c:
        for fact in extract_facts("I love spicy food"):
            graph.assert_fact(c, fact, {})
    pod.memories.add("My sister Ana is vegetarian and loves to cook", kind="fact")


def _requests(pod: Pod) -> list[AuditEntry]:
    return [e for e in entries(pod.store.conn) if e.kind == "generator.request"]


def test_a_turn_through_a_model_server_is_audited_with_the_bytes_it_received(
        pod: Pod) -> None:
    _remember(pod)
    with model_server("127.0.0.1") as (url, received):
        assistant = open_assistant(pod, "openai", url, embeddings=False)
        turn = assistant.respond(assistant.new_session(), MESSAGE)
        assert "".join(turn) == "Try a curry."
    assert len(received.requests) == 1
    got = received.requests[0]
    [entry] = _requests(pod)
    assert entry.peer == "127.0.0.1"
    assert entry.bytes == got["length"] == len(got["body"])  # what the server received
    assert entry.detail["route"] == got["path"] == "/v1/chat/completions"
    assert entry.detail["allowed_by"] == "loopback"
    # The kinds of data in the prompt, as counts, and they match what was sent.
    sent = json.loads(got["body"])["messages"]
    kinds = entry.detail["prompt"]
    assert kinds["message"] == 1 and kinds["system"] == 1
    assert kinds["preferences"] == len(turn.explanation.preferences) == 1
    assert kinds["memories"] == len(turn.explanation.memories) >= 1
    assert "spicy" in sent[0]["content"] and "vegetarian" in json.dumps(sent)
    row = pod.store.query("SELECT detail FROM audit_log WHERE kind = 'generator.request'")
    assert "sister" not in row[0][0] and "spicy" not in row[0][0]  # never the text
    # The pod report lists it among everything that left the pod.
    report = pod_report(pod_audit(pod))
    assert report["summary"]["egress_bytes"]["model server"] == entry.bytes
    egress = next(s for s in report["sections"] if s["id"] == "egress")
    rows = [r for t in egress["tables"] for r in t["rows"] if "127.0.0.1" in r]
    assert ["model server", "generator.request", "127.0.0.1", 1, entry.bytes] == rows[0][:5]
    prompts = next(t for t in egress["tables"] if t["title"].startswith("prompts sent"))
    assert prompts["rows"] == [["127.0.0.1", "loopback", 1, entry.bytes, 1, 1,
                                kinds["memories"], kinds["context"],
                                kinds["recent_turns"], 1]]


def test_a_server_off_the_loopback_gets_nothing_without_consent(
        tmp_path: Path, covey: Covey) -> None:
    address = lan_address()
    home = tmp_path / "pod"
    Pod.create(home, PASSPHRASE, name="p", config=FAST_CONFIG).close()
    env = cli_env(tmp_path)
    with model_server(address) as (url, received):
        refused = covey("chat", MESSAGE, "--home", str(home), "--generator", "openai",
                        "--url", url, env=env)
        assert refused.returncode == 12
        assert refused.stderr.strip().splitlines() == [
            f"error: refusing to send the prompt to {address}: it is not this machine's "
            f"loopback and you have not consented (covey pod consent remote_generator:"
            f"{address} --grant, or remote_generator for any host)"]
        # The API server refuses to start on it too.
        from covey.device.api import create_app

        with pytest.raises(RemoteConsentError):
            create_app(home, PASSPHRASE, "openai", url)
        assert received.requests == []  # nothing was sent
    with Pod.open(home, PASSPHRASE) as pod:
        assert pod.store.query("SELECT count(*) FROM messages")[0][0] == 0  # nor kept
        assert _requests(pod) == []


def test_with_consent_the_prompt_goes_and_is_audited_and_reported(
        tmp_path: Path, covey: Covey) -> None:
    address = lan_address()
    home = tmp_path / "pod"
    Pod.create(home, PASSPHRASE, name="p", config=FAST_CONFIG).close()
    env = cli_env(tmp_path)
    granted = covey("pod", "consent", f"remote_generator:{address}", "--grant", "--home",
                    str(home), env=env)
    assert granted.returncode == 0, granted.stderr
    with model_server(address) as (url, received):
        answered = covey("chat", MESSAGE, "--home", str(home), "--generator", "openai",
                         "--url", url, "--json", env=env)
        assert answered.returncode == 0, answered.stderr
        assert json.loads(answered.stdout)["reply"] == "Try a curry."
    [got] = received.requests
    report = covey("audit", "--pod", "--json", "--home", str(home), "--out",
                   str(tmp_path / "pod.html"), env=env)
    assert report.returncode == 0, report.stderr
    egress = next(s for s in json.loads(report.stdout)["sections"] if s["id"] == "egress")
    rows = [r for t in egress["tables"] for r in t["rows"] if r[:3] == [
        "model server", "generator.request", address]]
    assert rows and rows[0][3:5] == [1, got["length"]]
    with Pod.open(home, PASSPHRASE) as pod:
        [entry] = _requests(pod)
        assert entry.peer == address and entry.bytes == len(got["body"])
        assert entry.detail["allowed_by"] == f"remote_generator:{address}"


def test_a_consent_withdrawn_while_serving_stops_the_prompts(pod: Pod, tmp_path: Path
                                                            ) -> None:
    address = lan_address()
    set_consent(pod, "remote_generator", True)  # any host
    with model_server(address) as (url, received):
        assistant = open_assistant(pod, "openai", url, embeddings=False)
        session = assistant.new_session()
        assert "".join(assistant.respond(session, MESSAGE)) == "Try a curry."
        set_consent(pod, "remote_generator", False)
        with pytest.raises(RemoteConsentError):
            assistant.respond(session, "and for dessert?")
        assert len(received.requests) == 1
    assert [e.detail["allowed_by"] for e in _requests(pod)] == ["remote_generator"]
    assert pod.store.query("SELECT count(*) FROM messages WHERE role = 'user'")[0][0] == 1


def test_a_served_turn_to_a_server_without_consent_is_a_403(pod: Pod) -> None:
    from tests.device.test_api import _serving

    address = lan_address()
    pod.close()
    with Pod.open(pod.home, PASSPHRASE) as opened:
        set_consent(opened, "remote_generator", True)
    with model_server(address) as (url, received), \
            _serving(pod.home, generator="openai", url=url) as api:
        with Pod.open(pod.home, PASSPHRASE) as other:  # withdrawn from another process
            set_consent(other, "remote_generator", False)
        answer = api.call("POST", "/v1/chat/completions", json={
            "model": "covey", "messages": [{"role": "user", "content": MESSAGE}]})
        assert answer.status_code == 403
        assert answer.json()["error"]["code"] == "consent_required"
        assert received.requests == []


def test_loopback_is_decided_by_the_address_never_by_resolving_a_name() -> None:
    for host in ("127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost", "LOCALHOST",
                 "::ffff:127.0.0.1"):
        assert is_loopback(host), host
    for host in ("192.168.1.5", "10.0.0.1", "fd00::2", "ollama.lan", "localhost.evil.com",
                 "127.0.0.1.nip.io", "0.0.0.0"):
        assert not is_loopback(host), host
    assert is_consent_scope("remote_generator:ollama.lan")
    assert is_consent_scope("remote_generator:fd00::2")
    assert not is_consent_scope("remote_generator:bad host")
    assert not is_consent_scope("federated_training:x")
