"""The local API: a real uvicorn server on 127.0.0.1, spoken to by the official openai client."""

from __future__ import annotations

import base64
import json
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import uvicorn
from openai import OpenAI

from covey.device import Pod
from covey.device.api import MAX_BODY_BYTES, TOKEN_FILE, ChatRequest, create_app, ensure_token
from covey.device.store._audit import AuditEntry
from covey.models import SamplingParams
from tests.conftest import FAST_CONFIG, PASSPHRASE, cli_env
from tests.device._lan import lan_address

pytestmark = pytest.mark.integration

# Mounts `serve` on the root command when covey.cli does not do it (yet), then runs it.
_COVEY = (
    "import sys\n"
    "from covey.cli import app, main\n"
    "from covey.device.cli import serve\n"
    "if not any(c.name == 'serve' for c in app.registered_commands):\n"
    "    app.command('serve')(serve)\n"
    "main(sys.argv[1:])\n"
)


@dataclass
class Api:
    """A running server and what a client needs to reach it."""

    base: str
    token: str
    home: Path

    def client(self, token: str | None = None) -> OpenAI:
        return OpenAI(base_url=f"{self.base}/v1", api_key=token or self.token, max_retries=0)

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}", **kwargs.pop("headers", {})}
        return httpx.request(method, self.base + path, headers=headers, timeout=60, **kwargs)


@contextmanager
def _serving(home: Path, **options: str) -> Iterator[Api]:
    """A real uvicorn server for the pod at ``home`` on a free loopback port, in a thread."""
    app = create_app(home, PASSPHRASE, **options)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, ws="none"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    token = (home / TOKEN_FILE).read_text().strip()
    try:
        yield Api(f"http://127.0.0.1:{sock.getsockname()[1]}", token, home)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    home = tmp_path_factory.mktemp("api") / "pod"
    Pod.create(home, PASSPHRASE, name="api", config=FAST_CONFIG).close()
    with _serving(home) as running:
        yield running


def _audit_rows(home: Path) -> list[AuditEntry]:
    with Pod.open(home, PASSPHRASE) as pod:
        assert pod.verify_audit_chain().ok
        return [AuditEntry(**e) for e in pod.export()["audit_log"]]


def _stored_message(home: Path, message_id: int) -> str:
    with Pod.open(home, PASSPHRASE) as pod:
        return str(pod.store.query("SELECT content FROM messages WHERE id = ?",
                                   (message_id,))[0][0])


def _covey(reply: Any) -> dict[str, Any]:
    """The extra ``covey`` field of a completion or chunk."""
    extra: dict[str, Any] = reply.model_extra or {}
    return extra["covey"]


def _is_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code"} and error["message"]
    return error


# -- the OpenAI routes ---------------------------------------------------------------------


def test_chat_completion_remembers_and_explains(api: Api) -> None:
    reply = api.client().chat.completions.create(
        model="covey", user="alice-1", max_tokens=8, temperature=0, seed=3,
        messages=[{"role": "system", "content": "ignored: the pod builds its own prompt"},
                  {"role": "user", "content": "My sister is Ana."}])
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.prompt_tokens > 0
    assert 0 < reply.usage.completion_tokens <= 8
    covey = _covey(reply)
    assert covey["session"] == "alice-1"
    assert covey["explanation"]["learned"] == ["My sister is Ana."]
    assert _stored_message(api.home, covey["message_id"]) == choice.message.content
    again = api.client().chat.completions.create(
        model="covey", user="alice-1", max_tokens=8, temperature=0,
        messages=[{"role": "user", "content": "Who is my sister?"}])
    # The system text and the first exchange were read before this message came.
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details.cached_tokens > reply.usage.prompt_tokens


def test_streamed_chat_completion_honours_stop(api: Api) -> None:
    stream = api.client().chat.completions.create(
        model="covey", stream=True, max_tokens=16, temperature=0.9, seed=7, stop=["e"],
        messages=[{"role": "user", "content": "What should I do this weekend?"}],
        extra_headers={"X-Covey-Session": "weekend-plans"})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    last = chunks[-1]
    assert last.choices[0].finish_reason == "stop"  # an "e" (or the end of the turn) came
    assert last.usage is not None and last.usage.completion_tokens <= 16
    covey = _covey(last)
    assert covey["session"] == "weekend-plans" and covey["message_id"] > 0
    assert all("covey" not in (c.model_extra or {}) for c in chunks[:-1])
    assert "e" not in text
    assert _stored_message(api.home, covey["message_id"]) == text.strip()


def test_stream_is_server_sent_events_and_audited_with_its_size(api: Api) -> None:
    body = {"model": "covey", "stream": True, "max_tokens": 6,
            "messages": [{"role": "user", "content": "hello there"}]}
    with httpx.stream("POST", f"{api.base}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {api.token}"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(response.iter_raw())
    events = [e for e in raw.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"
    last = [e for e in _audit_rows(api.home) if e.kind == "api.response"][-1]
    assert last.detail == {"route": "/v1/chat/completions", "status": 200}
    assert last.bytes == len(raw)


def test_models_and_embeddings(api: Api) -> None:
    client = api.client()
    (model,) = client.models.list().data
    assert model.id.startswith("onnx:") and model.owned_by == "covey"
    texts = ["I walk the dog at seven", "the dog gets walked at 7", "tax forms are due"]
    result = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts)
    vectors = np.array([d.embedding for d in result.data])
    assert vectors.shape == (3, 384) and [d.index for d in result.data] == [0, 1, 2]
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]
    packed = client.embeddings.create(model="x", input=texts[0], encoding_format="base64")
    decoded = np.frombuffer(base64.b64decode(str(packed.data[0].embedding)), dtype="<f4")
    assert np.allclose(decoded, vectors[0], atol=1e-6)
    assert result.usage.prompt_tokens > 0


# -- refusals ------------------------------------------------------------------------------


def test_requests_without_the_token_are_refused(api: Api) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        api.client(token="not-the-token").models.list()
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    for path in ("/v1/models", "/metrics", "/covey/memories", "/no/such/route"):
        _is_openai_error(httpx.get(api.base + path), 401)
    token_file = api.home / TOKEN_FILE
    assert token_file.stat().st_mode & 0o777 == 0o600
    # The token is kept (a second app on the same pod uses it), and kept private.
    token_file.chmod(0o644)
    assert ensure_token(api.home) == api.token
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert create_app(api.home, None).state.served.locked
    assert token_file.read_text().strip() == api.token


def test_request_settings_become_sampling_params() -> None:
    request = ChatRequest.model_validate({
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi "},
                                                  {"type": "text", "text": "there"}]}],
        "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "stop": "\n", "seed": 11})
    assert request.turn_text() == "hi there"
    assert request.sampling(SamplingParams(max_tokens=48, top_k=5)) == SamplingParams(
        max_tokens=7, temperature=0.5, top_k=5, top_p=0.9, stop=("\n",), seed=11)
    plain = ChatRequest.model_validate({"messages": [{"role": "user", "content": "x"}],
                                        "stop": ["a", "b"]})
    assert plain.sampling(SamplingParams()) == SamplingParams(stop=("a", "b"))


def test_bad_bodies_get_openai_errors(api: Api) -> None:
    chat = "/v1/chat/completions"
    huge = {"model": "m", "messages": [{"role": "user", "content": "x" * (MAX_BODY_BYTES + 1)}]}
    assert _is_openai_error(api.call("POST", chat, json=huge), 413)["code"] == "request_too_large"
    assert _is_openai_error(api.call("POST", chat, content=b"{not json",
                                     headers={"Content-Type": "application/json"}), 400)
    assert _is_openai_error(api.call("POST", chat, json={"model": "m"}), 422)["code"] == \
        "invalid_body"
    with pytest.raises(openai.UnprocessableEntityError):
        api.client().chat.completions.create(
            model="m", temperature=5, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        api.client().chat.completions.create(
            model="m", messages=[{"role": "system", "content": "no user message"}])
    with pytest.raises(openai.BadRequestError):
        api.client().chat.completions.create(
            model="m", user="no spaces allowed", messages=[{"role": "user", "content": "hi"}])
    bodies: list[dict[str, Any]] = [{"input": []}, {"input": [""]}]
    for body in bodies:
        _is_openai_error(api.call("POST", "/v1/embeddings", json=body), 400)
    _is_openai_error(api.call("POST", "/v1/embeddings", json={"input": [1, 2]}), 422)
    _is_openai_error(api.call("POST", "/covey/feedback", json={"rating": 3}), 422)
    _is_openai_error(api.call("GET", "/no/such/route"), 404)
    _is_openai_error(api.call("GET", "/covey/memories", params={"limit": 0}), 422)


def test_an_unreachable_generator_is_a_502(api: Api, tmp_path: Path) -> None:
    # A second pod whose generator is the first pod's API, without its token: refused.
    home = tmp_path / "relay"
    Pod.create(home, PASSPHRASE, name="relay", config=FAST_CONFIG).close()
    with _serving(home, generator="openai", url=api.base) as relay:
        client = relay.client()
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hello?"}])
        assert caught.value.status_code == 502 and caught.value.code == "generator_unavailable"
        with pytest.raises(openai.APIError, match="unreachable"):
            list(client.chat.completions.create(
                model="m", stream=True, messages=[{"role": "user", "content": "hello?"}]))
        assert relay.call("GET", "/v1/models").json()["data"][0]["id"] == "openai:default"


# -- covey's routes ------------------------------------------------------------------------


def test_memories_can_be_listed_recalled_and_forgotten(api: Api) -> None:
    api.client().chat.completions.create(
        model="covey", max_tokens=4, messages=[{"role": "user",
                                                "content": "My favorite color is teal."}])
    listed = api.call("GET", "/covey/memories").json()["data"]
    teal = next(m for m in listed if m["text"] == "My favorite color is teal.")
    recalled = api.call("GET", "/covey/memories",
                        params={"query": "which colour do I like?", "limit": 2}).json()["data"]
    assert recalled[0]["id"] == teal["id"] and "score" in recalled[0] and len(recalled) <= 2
    assert api.call("DELETE", f"/covey/memories/{teal['id']}").json()["forgotten"] is True
    assert _is_openai_error(api.call("DELETE", f"/covey/memories/{teal['id']}"), 404)
    listed = api.call("GET", "/covey/memories").json()["data"]
    assert all(m["id"] != teal["id"] for m in listed)


def test_feedback_creates_training_examples(api: Api) -> None:
    reply = api.client().chat.completions.create(
        model="covey", max_tokens=6, messages=[{"role": "user", "content": "any tips for tea?"}])
    message_id = _covey(reply)["message_id"]
    up = api.call("POST", "/covey/feedback", json={"rating": 1, "message_id": message_id})
    assert up.status_code == 200 and up.json()["example_id"] is not None
    fixed = api.call("POST", "/covey/feedback", json={"correction": "Try green tea at 80 C."})
    assert fixed.json()["message_id"] == message_id
    _is_openai_error(api.call("POST", "/covey/feedback", json={}), 400)
    with Pod.open(api.home, PASSPHRASE) as pod:
        rows = pod.store.query("SELECT prompt, target, source FROM training_examples"
                               " ORDER BY id DESC LIMIT 2")
    assert [tuple(r) for r in rows] == [
        ("any tips for tea?", "Try green tea at 80 C.", "correction"),
        ("any tips for tea?", reply.choices[0].message.content, "accepted")]


def test_every_response_is_audited_without_content(api: Api) -> None:
    canary = f"My pet falcon is Zephyr{secrets.token_hex(4)}."
    before = len(_audit_rows(api.home))
    client = api.client()
    client.chat.completions.create(model="covey", max_tokens=4,
                                   messages=[{"role": "user", "content": canary}])
    list(client.chat.completions.create(model="covey", max_tokens=4, stream=True,
                                        messages=[{"role": "user", "content": canary}]))
    listed = api.call("GET", "/covey/memories", params={"query": canary})
    assert canary in listed.text  # the pod did answer with the canary
    rows = _audit_rows(api.home)[before:]
    responses = [e for e in rows if e.kind == "api.response"]
    assert len(responses) >= 3
    for entry in responses:
        assert entry.peer == "local-api" and entry.bytes > 0
        assert set(entry.detail) == {"route", "status"}
    assert responses[-1].bytes == len(listed.content)
    assert responses[-1].detail == {"route": "/covey/memories", "status": 200}
    word = canary.split()[-1].rstrip(".")
    assert not any(word in json.dumps(e.__dict__) for e in _audit_rows(api.home))


def test_metrics_report_stages_and_requests(api: Api) -> None:
    api.client().chat.completions.create(
        model="covey", max_tokens=3, messages=[{"role": "user", "content": "ping"}])
    assert httpx.get(f"{api.base}/v1/models").status_code == 401
    text = api.call("GET", "/metrics").text
    for stage in ("retrieve", "assemble", "first_token", "reply", "total"):
        assert f'covey_chat_stage_seconds_count{{stage="{stage}"}}' in text
    assert 'covey_api_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'route="/v1/models",status="401"' in text


def test_lock_closes_the_store_until_unlocked(api: Api) -> None:
    _is_openai_error(api.call("POST", "/covey/unlock", json={"passphrase": PASSPHRASE}), 400)
    assert api.call("POST", "/covey/lock").json() == {"locked": True}
    assert _audit_rows(api.home)[-1].detail == {"route": "/covey/lock", "status": 200}
    error = _is_openai_error(api.call("GET", "/covey/memories"), 503)
    assert error["message"] == "the pod is locked" and error["code"] == "pod_locked"
    with pytest.raises(openai.InternalServerError) as caught:
        api.client().chat.completions.create(
            model="m", messages=[{"role": "user", "content": "are you there?"}])
    assert caught.value.status_code == 503
    _is_openai_error(api.call("POST", "/covey/unlock", json={"passphrase": "wrong one"}), 401)
    assert api.call("POST", "/covey/unlock", json={"passphrase": PASSPHRASE}).status_code == 200
    assert api.call("GET", "/v1/models").status_code == 200


# -- concurrency ---------------------------------------------------------------------------


def test_cli_writes_while_the_api_answers(api: Api, tmp_path: Path) -> None:
    notes = ["I keep bees on the roof", "My bicycle is painted green",
             "The piano needs tuning in March", "We adopted a grey cat named Pixel"]
    notes = [f"{n} ({secrets.token_hex(3)})" for n in notes]
    stop = threading.Event()

    def chats(k: int) -> int:
        client = api.client()
        done = 0
        while done < 2 or not stop.is_set():  # keeps answering until every CLI write is in
            reply = client.chat.completions.create(model="covey", max_tokens=6, messages=[
                {"role": "user", "content": f"tell me a story, part {k}.{done}"}])
            assert _covey(reply)["message_id"] > 0
            done += 1
        return done

    def reads() -> list[int]:
        codes = []
        while not stop.is_set():
            codes.append(api.call("GET", "/covey/memories", params={"query": "roof"})
                         .status_code)
        return codes

    env = cli_env(tmp_path)
    with ThreadPoolExecutor(3) as pool:
        workers = [pool.submit(chats, 0), pool.submit(chats, 1)]
        reader = pool.submit(reads)
        adds = [subprocess.Popen([sys.executable, "-m", "covey", "memory", "add", note,
                                  "--home", str(api.home)], env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for note in notes]
        outcomes = [(p.wait(timeout=120), p.stderr.read() if p.stderr else "") for p in adds]
        stop.set()
        answered = [worker.result(timeout=120) for worker in workers]
        codes = reader.result(timeout=60)
    for process in adds:
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
    assert [code for code, _ in outcomes] == [0] * len(notes), outcomes
    assert min(answered) >= 2 and codes and set(codes) == {200}
    listed = {m["text"] for m in api.call("GET", "/covey/memories",
                                          params={"limit": 1000}).json()["data"]}
    assert set(notes) <= listed
    with Pod.open(api.home, PASSPHRASE) as pod:
        assert pod.verify_audit_chain().ok
        assert {m.text for m in pod.memories.all()} >= set(notes)


# -- the command ---------------------------------------------------------------------------


def test_serve_refuses_a_non_loopback_address(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _COVEY, "serve", "--host", "0.0.0.0",
         "--home", str(tmp_path / "pod")],
        env=cli_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("error: refusing to serve on 0.0.0.0")
    assert len(result.stderr.strip().splitlines()) == 1


def _serve(tmp_path: Path, home: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _COVEY, "serve", "--home", str(home),
                             "--port", "0", "--json", "--no-sync", *args],
                            env=cli_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _end(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()


def test_serve_refuses_plain_http_beyond_the_loopback(tmp_path: Path) -> None:
    address = lan_address()
    home = tmp_path / "pod"
    Pod.create(home, PASSPHRASE, name="cli", config=FAST_CONFIG).close()
    process = _serve(tmp_path, home, "--host", address, "--allow-remote")
    try:
        assert process.wait(timeout=30) == 2, "it served the token over plain HTTP"
        assert process.stderr is not None
        err = process.stderr.read()
        assert err.startswith(f"error: refusing to serve on {address} over plain HTTP")
        assert len(err.strip().splitlines()) == 1
    finally:
        _end(process)
    half = _serve(tmp_path, home, "--host", address, "--allow-remote", "--tls-cert",
                  str(tmp_path / "none.pem"))
    try:
        assert half.wait(timeout=30) == 2
        assert half.stderr is not None
        assert half.stderr.read().strip() == "error: --tls-cert and --tls-key go together"
    finally:
        _end(half)


def test_serve_beyond_the_loopback_speaks_only_tls(tmp_path: Path) -> None:
    import ssl

    from covey.aggregator._deploy import AggregatorHome

    address = lan_address()
    certs = AggregatorHome(tmp_path / "ca")
    ca = certs.make_certs([address])
    home = tmp_path / "pod"
    Pod.create(home, PASSPHRASE, name="cli", config=FAST_CONFIG).close()
    process = _serve(tmp_path, home, "--host", address, "--allow-remote",
                     "--tls-cert", str(certs.certs / "server.pem"),
                     "--tls-key", str(certs.certs / "server.key"))
    try:
        assert process.stdout is not None
        info = json.loads(process.stdout.readline())
        assert info["url"].startswith(f"https://{address}:")
        token = Path(info["token_file"]).read_text().strip()
        trust = ssl.create_default_context(cafile=str(ca))
        answer = httpx.get(info["url"] + "/models", headers={"Authorization":
                                                            f"Bearer {token}"},
                           verify=trust, timeout=30)
        assert answer.status_code == 200 and answer.json()["data"][0]["owned_by"] == "covey"
        plain = info["url"].replace("https://", "http://")
        with pytest.raises(httpx.HTTPError):  # no plain HTTP on that port
            httpx.get(plain + "/models", headers={"Authorization": f"Bearer {token}"},
                      timeout=30)
    finally:
        _end(process)


def test_serve_command_answers_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    home = tmp_path / "pod"
    Pod.create(home, PASSPHRASE, name="cli", config=FAST_CONFIG).close()
    process = subprocess.Popen(
        [sys.executable, "-c", _COVEY, "serve", "--home", str(home), "--port", "0", "--json"],
        env=cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        info = json.loads(process.stdout.readline())
        assert info["token_file"] == str(home / TOKEN_FILE)
        token = Path(info["token_file"]).read_text().strip()
        client = OpenAI(base_url=info["url"], api_key=token, max_retries=2)
        assert client.models.list().data[0].owned_by == "covey"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
    kinds = [e.kind for e in _audit_rows(home)]
    assert kinds.count("api.response") == 1
