"""The `openai` generator against a real HTTP server on loopback speaking the OpenAI API."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from covey.models._generate import BackendUnavailableError, SamplingParams, create_generator
from covey.models._tokenizer import ChatMessage
from tests.conftest import Covey

REPLY = ["Hel", "lo", " from", " a", " server", "!"]


class _OpenAIHandler(BaseHTTPRequestHandler):
    requests: ClassVar[list[dict]] = []

    def log_message(self, *args: object) -> None:
        return

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _OpenAIHandler.requests.append({"path": self.path, "body": body,
                                        "auth": self.headers.get("Authorization")})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        chat = self.path == "/v1/chat/completions"
        for i, piece in enumerate(REPLY):
            choice = ({"delta": {"content": piece}} if chat else {"text": piece})
            choice["finish_reason"] = "stop" if i == len(REPLY) - 1 else None
            self.wfile.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        return  # a client that hangs up early (cancellation) is expected here


@pytest.fixture
def server() -> Iterator[str]:
    httpd = _QuietServer(("127.0.0.1", 0), _OpenAIHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    _OpenAIHandler.requests.clear()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_chat_and_text_stream(server: str) -> None:
    gen = create_generator("openai", base_url=server, model="llama3", api_key="k")
    params = SamplingParams(max_tokens=9, temperature=0.5, stop=("###",), seed=3)
    pieces = list(gen.stream_chat([ChatMessage("user", "hi")], params))
    assert pieces == REPLY
    assert gen.finish_reason == "stop"
    sent = _OpenAIHandler.requests[-1]
    assert sent["path"] == "/v1/chat/completions" and sent["auth"] == "Bearer k"
    assert sent["body"]["messages"] == [{"role": "user", "content": "hi"}]
    assert sent["body"]["stream"] is True and sent["body"]["max_tokens"] == 9
    assert sent["body"]["stop"] == ["###"] and sent["body"]["model"] == "llama3"
    assert "".join(gen.stream_text("once upon", params)) == "".join(REPLY)
    assert _OpenAIHandler.requests[-1]["path"] == "/v1/completions"


def test_cancellation(server: str) -> None:
    gen = create_generator("openai", base_url=server)
    cancel = threading.Event()
    got = []
    for piece in gen.stream_chat([ChatMessage("user", "hi")], SamplingParams(), cancel):
        got.append(piece)
        cancel.set()
    assert got == REPLY[:1]


def test_unreachable_server_is_one_clear_error() -> None:
    gen = create_generator("openai", base_url="http://127.0.0.1:9", timeout=2)
    with pytest.raises(BackendUnavailableError, match="unreachable"):
        list(gen.stream_chat([ChatMessage("user", "hi")], SamplingParams()))


def test_cli_unreachable(covey: Covey) -> None:
    result = covey("models", "generate", "hi", "--backend", "openai", "--url",
                   "http://127.0.0.1:9")
    assert result.returncode == 9
    assert result.stderr.strip().splitlines() == [
        "error: the generator at http://127.0.0.1:9 is unreachable (ConnectError)"]
    bad = covey("models", "generate", "hi", "--backend", "openai")
    assert bad.returncode == 2 and "--url" in bad.stderr
