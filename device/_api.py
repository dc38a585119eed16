"""The pod's local API: OpenAI-compatible routes and covey's own, on 127.0.0.1.

Routes (every one needs ``Authorization: Bearer <token>``, the token kept in
``<pod home>/api.token``, mode 0600; ``/metrics`` too, because request counts and
latencies reveal how the pod is used):

    POST   /v1/chat/completions      one chat turn; JSON or server-sent events
    GET    /v1/models                the pod's generator, as one model id
    POST   /v1/embeddings            sentence embeddings (all-MiniLM-L6-v2)
    POST   /covey/feedback           rate (+1 / -1) or correct a reply
    GET    /covey/memories           list memories, or recall them (?query=, ?limit=)
    DELETE /covey/memories/{id}      erase one memory
    POST   /covey/lock               close the store; later requests get 503
    POST   /covey/unlock             open it again with {"passphrase": ...}
    GET    /metrics                  Prometheus text: stage latencies, requests by route

A chat turn is the pod's own: only the last user message of ``messages`` is used as
the turn text; the context comes from the pod's memory (recent turns, memories,
preferences). The session is the body's ``user`` or the ``X-Covey-Session`` header
(created when new), else the pod's last session. The reply carries an extra field
``covey: {session, message_id, explanation}``; when streaming, in the last chunk.

Every response is an egress: it is written to the pod's audit log as ``api.response``
to peer ``local-api`` with the body's size and ``{route, status}``, never content.
A plain response is recorded before its body is sent; a stream is recorded once, when
its last byte is about to be sent (or when the client goes away). Responses given
while the pod is locked cannot be recorded (the store is closed); they carry no pod
data. Refusals (401) are recorded too: they are responses to another process.

Errors have OpenAI's shape, ``{"error": {"message", "type", "code"}}``: 400 a value the
pod refuses (or malformed JSON), 401 no or wrong token (or, on unlock, passphrase),
403 the generator's server is off this machine and the user has not consented to
sending it prompts (``code: consent_required``), 404 unknown route or memory, 413 a
body over :data:`MAX_BODY_BYTES`, 422 a body that does not fit the schema, 502 the
generator's server is unreachable, 503 the pod is locked (``code: pod_locked``) or its
store stayed busy (``pod_busy``).

Threads: handlers run in a thread pool, but the SQLCipher connection is used by one
thread at a time (:class:`ServedPod`'s access lock); a chat turn also holds the turn
lock, taken first, for its whole length, and the access lock only for each step, so
other requests are answered between tokens.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import anyio
import numpy as np
from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException
from starlette.routing import Match, Router

from covey._files import fsync_dir
from covey.device._chat import Assistant, open_assistant
from covey.device._egress import RemoteConsentError
from covey.device._feedback import give_feedback
from covey.device._pod import Pod
from covey.errors import (
    CoveyError,
    InvalidInputError,
    PodLockedError,
    PodNotFoundError,
    WrongPassphraseError,
)
from covey.models import SamplingParams
from covey.privacy import UserText

__all__ = [
    "AUDIT_KIND",
    "AUDIT_PEER",
    "MAX_BODY_BYTES",
    "SESSION_HEADER",
    "TOKEN_FILE",
    "ApiPodLockedError",
    "ListenError",
    "RemoteBindError",
    "ServedPod",
    "check_bind_host",
    "create_app",
    "ensure_token",
]

TOKEN_FILE = "api.token"  # noqa: S105 - a file name, not a secret
MAX_BODY_BYTES = 1 << 20
_DRAIN_BYTES = 16 * MAX_BODY_BYTES
SESSION_HEADER = "X-Covey-Session"
AUDIT_KIND = "api.response"
AUDIT_PEER = "local-api"
EMBEDDING_MODEL = "all-MiniLM-L6-v2"
MAX_EMBED_INPUTS = 256
MAX_EMBED_CHARS = 8192
_SESSION_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_STAGES = ("store", "retrieve", "assemble", "first_token", "reply")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


# -- errors ------------------------------------------------------------------------------


class RemoteBindError(CoveyError):
    """`covey serve` was asked to listen beyond this machine without --allow-remote."""

    exit_code = 2

    def __init__(self, host: str) -> None:
        super().__init__(f"refusing to serve on {host}: not a loopback address "
                         "(the API is for this machine; --allow-remote overrides)")


class PlainRemoteError(CoveyError):
    """`covey serve --allow-remote` on a non-loopback address without TLS."""

    exit_code = 2

    def __init__(self, host: str) -> None:
        super().__init__(f"refusing to serve on {host} over plain HTTP: the token and the "
                         "pod's data would cross the network in the clear (pass --tls-cert "
                         "and --tls-key)")


class ListenError(CoveyError):
    """The API's address cannot be bound (in use, or not on this machine)."""

    exit_code = 2

    def __init__(self, host: str, port: int, reason: str) -> None:
        super().__init__(f"cannot listen on {host}:{port} ({reason})")


class ApiPodLockedError(CoveyError):
    """The API was asked for the pod while it is locked (POST /covey/unlock opens it)."""

    exit_code = 5

    def __init__(self) -> None:
        super().__init__("the pod is locked")


def _error_body(message: str, kind: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": code}}


def _error(status: int, message: str, kind: str = "invalid_request_error",
           code: str = "invalid_request") -> JSONResponse:
    return JSONResponse(_error_body(message, kind, code), status_code=status)


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


# -- the token and the bind address --------------------------------------------------------


def ensure_token(home: Path) -> str:
    """The API token in ``home/api.token``, created (mode 0600) on first use."""
    path = home / TOKEN_FILE
    token = _read_token(path)
    if token is not None:
        return token
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{TOKEN_FILE}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (token + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        if path.exists():  # a damaged token is replaced
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if another `covey serve` created one meanwhile
    except FileExistsError:
        return ensure_token(home)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(home)
    return token


def _read_token(path: Path) -> str | None:
    try:
        mode = path.stat().st_mode
        token = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, OSError):
        _log.warning("the API token file %s is unreadable; making a new token", path)
        return None
    if mode & 0o077:
        _log.warning("the API token file %s was readable by others; now owner-only", path)
        path.chmod(0o600)
    if len(token) < 32 or not token.isascii():
        _log.warning("the API token file %s is damaged; making a new token", path)
        return None
    return token


def check_bind_host(host: str, allow_remote: bool, tls: bool = False) -> None:
    """Refuse a non-loopback ``host`` unless ``allow_remote`` and ``tls``; a remote
    address logs a warning.

    Raises:
        RemoteBindError: ``host`` is not a loopback address and remote use is not allowed.
        PlainRemoteError: remote use is allowed but would be plain HTTP: the bearer token
            opens the whole pod, so it never crosses a network unencrypted.
    """
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return
    if not allow_remote:
        raise RemoteBindError(host)
    if not tls:
        raise PlainRemoteError(host)
    _log.warning("serving the pod's API on %s: any machine that can reach it and holds "
                 "the token can read the pod's memories", host)


# -- the pod as the API serves it -------------------------------------------------------------


class ServedPod:
    """The pod behind the API: locked or unlocked, its connection used by one thread at a time.

    Two locks, always taken in this order: ``_turns`` (one chat turn at a time, for the
    whole turn) and ``_access`` (the SQLCipher connection and the in-memory indexes,
    for one step). Locking the pod takes both, so it waits for a running turn.
    """

    def __init__(self, home: Path, generator: str | None, url: str | None) -> None:
        self.home = home
        self._generator = generator
        self._url = url
        self._pod: Pod | None = None
        self._assistant: Assistant | None = None
        self._embedder: Any = None
        self._turns = threading.Lock()
        self._access = threading.Lock()

    @property
    def locked(self) -> bool:
        """Whether the store is closed."""
        return self._pod is None

    def unlock(self, passphrase: str) -> None:
        """Open the pod and its assistant.

        Raises:
            WrongPassphraseError, PodNotFoundError, ...: from :meth:`Pod.open`.
            InvalidInputError: the pod is already unlocked.
        """
        with self._turns, self._access:
            if self._pod is not None:
                raise InvalidInputError("the pod is already unlocked")
            pod = Pod.open(self.home, passphrase)
            try:
                assistant = open_assistant(pod, self._generator, self._url, embeddings=False)
                pod.memories.use_embedder(self._load_embedder())
            except BaseException:
                pod.close()
                raise
            self._pod, self._assistant = pod, assistant

    @property
    def embedder(self) -> Any:
        """The sentence embedder (loaded on first use, once per process)."""
        return self._load_embedder()

    def _load_embedder(self) -> Any:
        # Loaded once per process: it holds no user data and survives lock/unlock.
        if self._embedder is None:
            from covey.models import create_embedder

            self._embedder = create_embedder("minilm-onnx")
        return self._embedder

    def lock(self, last_response: tuple[str, int, int] | None = None) -> bool:
        """Close the store after the running turn; False if it was already locked.

        ``last_response`` (route, status, bytes) is audited first: once the store is
        closed, the response saying so can no longer be recorded.
        """
        with self._turns, self._access:
            if self._pod is None:
                return False
            if last_response is not None:
                self._audit(self._pod, *last_response)
            self._pod.close()
            self._pod = self._assistant = None
            return True

    @contextmanager
    def access(self) -> Iterator[tuple[Pod, Assistant]]:
        """The unlocked pod and assistant, for this thread alone.

        Raises:
            ApiPodLockedError: the pod is locked.
        """
        with self._access:
            if self._pod is None or self._assistant is None:
                raise ApiPodLockedError()
            yield self._pod, self._assistant

    @contextmanager
    def turn(self) -> Iterator[None]:
        """Hold the turn lock: one chat turn at a time (the model and its usage are shared)."""
        with self._turns:
            yield

    def audit_response(self, route: str, status: int, nbytes: int) -> None:
        """Record a response in the audit log; skipped (and logged) while locked."""
        with self._access:
            if self._pod is None:
                _log.info("response on %s (%d) not audited: the pod is locked", route, status)
                return
            self._audit(self._pod, route, status, nbytes)

    @staticmethod
    def _audit(pod: Pod, route: str, status: int, nbytes: int) -> None:
        try:
            pod.audit(AUDIT_KIND, peer=AUDIT_PEER, nbytes=nbytes,
                      detail={"route": route, "status": status})
        except CoveyError as exc:
            # Its headers are out: the response cannot be recalled, so say loudly that it
            # went unrecorded (in practice: the store stayed busy past its timeout).
            _log.error("a %d-byte response on %s could not be audited: %s", nbytes, route, exc)

    def close(self) -> None:
        """Lock the pod, if it is open (at shutdown)."""
        self.lock()


# -- metrics ----------------------------------------------------------------------------------


@dataclasses.dataclass
class ApiMetrics:
    """Prometheus metrics of one app, in their own registry."""

    registry: CollectorRegistry
    requests: Counter
    stages: Histogram

    @classmethod
    def create(cls) -> ApiMetrics:
        """Fresh metrics."""
        registry = CollectorRegistry()
        return cls(
            registry,
            Counter("covey_api_requests", "API responses by route template and status.",
                    ["route", "status"], registry=registry),
            Histogram("covey_chat_stage_seconds",
                      "Chat turn latency by stage (store, retrieve, assemble, first_token, "
                      "reply) and for the whole request (total).",
                      ["stage"], registry=registry, buckets=_LATENCY_BUCKETS),
        )

    def observe_turn(self, timings: dict[str, float], total_s: float) -> None:
        """Record one chat turn's stage timings."""
        for stage in _STAGES:
            if f"{stage}_s" in timings:
                self.stages.labels(stage).observe(timings[f"{stage}_s"])
        self.stages.labels("total").observe(total_s)


# -- the gate: token, body limit, audit and counting of every response -------------------------


class _Gate:
    """ASGI middleware: bearer token, body size limit, audit and counters for each response."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], *,
                 served: ServedPod, metrics: ApiMetrics, token: str, router: Router) -> None:
        self.app = app
        self.served = served
        self.metrics = metrics
        self.token = token.encode()
        self.router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self._route(scope)
        record = _Sent(route)

        async def tracked(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = int(message["status"])
            elif message["type"] == "http.response.body":
                record.nbytes += len(message.get("body", b""))
                if not message.get("more_body", False):
                    await self._audit(record)
            await send(message)

        try:
            await self._handle(scope, receive, tracked)
        except Exception:
            _log.error("internal error on %s", route, exc_info=True)
            if record.status == 0:
                await _error(500, "internal error; details are in the pod's log", "api_error",
                             "internal_error")(scope, receive, tracked)
        finally:
            if record.status and not record.audited:  # the client went away mid-stream
                with anyio.CancelScope(shield=True):
                    await self._audit(record)
            self.metrics.requests.labels(route, str(record.status or 499)).inc()

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        if not self._authorised(headers.get("authorization", "")):
            response = _error(401, "missing or wrong bearer token (see api.token in the pod "
                              "home)", "authentication_error", "invalid_api_key")
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        body = await _read_body(receive, headers.get("content-length"))
        if body is None:
            await _error(413, f"the request body exceeds {MAX_BODY_BYTES} bytes",
                         code="request_too_large")(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    def _authorised(self, header: str) -> bool:
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                                 self.token)

    def _route(self, scope: Scope) -> str:
        """The route's path template (never the path itself: it may carry user text)."""
        for candidate in self.router.routes:
            match, _ = candidate.matches(scope)
            if match != Match.NONE:
                return str(getattr(candidate, "path", "unmatched"))
        return "unmatched"

    async def _audit(self, record: _Sent) -> None:
        if record.audited:
            return
        record.audited = True
        await anyio.to_thread.run_sync(self.served.audit_response, record.route,
                                       record.status, record.nbytes)


@dataclasses.dataclass
class _Sent:
    route: str
    status: int = 0
    nbytes: int = 0
    audited: bool = False


async def _read_body(receive: Receive, declared: str | None) -> bytes | None:
    """The whole request body, or None when it is larger than :data:`MAX_BODY_BYTES`.

    An oversized body is still read to its end (up to :data:`_DRAIN_BYTES`) and dropped,
    so the client, still sending, gets the 413 rather than a reset connection.
    """
    if declared is not None and declared.strip().isdigit() and int(declared) > _DRAIN_BYTES:
        return None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break  # a disconnect: the app will notice it too
        chunk = message.get("body", b"")
        size += len(chunk)
        if size <= MAX_BODY_BYTES:
            chunks.append(chunk)
        elif size > _DRAIN_BYTES:
            return None
        if not message.get("more_body", False):
            break
    return b"".join(chunks) if size <= MAX_BODY_BYTES else None


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


# -- request bodies ---------------------------------------------------------------------------


class _ContentPart(BaseModel):
    type: str
    text: str | None = None


class ChatMessageIn(BaseModel):
    """One message of a chat request."""

    role: str = Field(max_length=32)
    content: str | list[_ContentPart] | None = None

    def text(self) -> str:
        """The message's text (text parts joined)."""
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class ChatRequest(BaseModel):
    """The body of POST /v1/chat/completions (unknown OpenAI fields are ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(default=None, max_length=256)
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=512)
    max_tokens: int | None = Field(default=None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=4096)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)
    user: str | None = Field(default=None, max_length=64)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4 or any(not 1 <= len(s) <= 64 for s in stops):
            raise ValueError("stop is up to 4 sequences of 1 to 64 characters")
        return value

    def turn_text(self) -> str:
        """The last user message: the turn's text.

        Raises:
            InvalidInputError: there is no user message.
        """
        for message in reversed(self.messages):
            if message.role == "user":
                return message.text()
        raise InvalidInputError("messages holds no user message")

    def sampling(self, default: SamplingParams) -> SamplingParams:
        """The request's sampling settings over the assistant's defaults."""
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        changes: dict[str, Any] = {
            "max_tokens": self.max_completion_tokens or self.max_tokens,
            "temperature": self.temperature, "top_p": self.top_p,
            "stop": tuple(stop) if stop is not None else None,
            "seed": self.seed,
        }
        return dataclasses.replace(default, **{k: v for k, v in changes.items() if v is not None})


class EmbeddingRequest(BaseModel):
    """The body of POST /v1/embeddings."""

    model_config = ConfigDict(extra="ignore")

    input: str | list[str]
    model: str | None = Field(default=None, max_length=256)
    encoding_format: Literal["float", "base64"] = "float"

    def texts(self) -> list[str]:
        """The inputs as a list.

        Raises:
            InvalidInputError: none, an empty one, or one too long.
        """
        texts = [self.input] if isinstance(self.input, str) else list(self.input)
        if not 1 <= len(texts) <= MAX_EMBED_INPUTS or any(
                not t or len(t) > MAX_EMBED_CHARS for t in texts):
            raise InvalidInputError(f"input is 1 to {MAX_EMBED_INPUTS} texts of 1 to "
                                    f"{MAX_EMBED_CHARS} characters")
        return texts


class FeedbackRequest(BaseModel):
    """The body of POST /covey/feedback: a rating or a correction."""

    model_config = ConfigDict(extra="forbid")

    rating: Literal[1, -1] | None = None
    correction: str | None = Field(default=None, max_length=4000)
    message_id: int | None = Field(default=None, ge=1)


class UnlockRequest(BaseModel):
    """The body of POST /covey/unlock."""

    model_config = ConfigDict(extra="forbid")

    passphrase: str = Field(min_length=1, max_length=1024)


# -- chat turns -------------------------------------------------------------------------------


@dataclasses.dataclass
class TurnResult:
    """A finished turn, as the API reports it."""

    text: str
    finish_reason: str
    usage: dict[str, Any]
    covey: dict[str, Any]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _session(assistant: Assistant, requested: str | None) -> str:
    """The requested session (created when new), else the last one (created if none)."""
    if requested is None:
        return assistant.last_session() or assistant.new_session()
    if not _SESSION_ID.fullmatch(requested):
        raise InvalidInputError("a session id is 1 to 64 letters, digits or . _ : -")
    store = assistant.pod.store
    if not store.query("SELECT 1 FROM conversations WHERE session_id = ?", (requested,)):
        with store.transaction() as c:
            c.execute("INSERT INTO conversations (session_id, started_at) VALUES (?, ?)",
                      (requested, _now()))
    return requested


def _usage(assistant: Assistant, text: str, tokens: dict[str, int]) -> dict[str, Any]:
    usage = getattr(assistant.generator, "usage", None)
    details = None
    if isinstance(usage, dict) and "completion_tokens" in usage:
        prompt, completion = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
        # As OpenAI reports it: prompt tokens the generator's prefix cache already held.
        details = {"cached_tokens": int(usage.get("cached_tokens", 0))}
    else:  # a backend that does not count (an OpenAI-compatible server): our tokenizer's
        prompt, completion = sum(tokens.values()), assistant.count(text)
    body: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                            "total_tokens": prompt + completion}
    if details is not None:
        body["prompt_tokens_details"] = details
    return body


def run_turn(served: ServedPod, metrics: ApiMetrics, request: ChatRequest,
             session_hint: str | None, cancel: threading.Event,
             on_start: Callable[[str], None], on_piece: Callable[[str], None]) -> TurnResult:
    """One chat turn: ``on_start(model)`` once it is accepted, then ``on_piece`` per piece.

    Raises:
        InvalidInputError, ApiPodLockedError: the turn is refused (before ``on_start``).
        BackendUnavailableError: the generator's server cannot be reached.
    """
    started = time.perf_counter()
    with served.turn():
        with served.access() as (_, assistant):
            session = _session(assistant, request.user or session_hint)
            turn = assistant.respond(session, UserText(request.turn_text()),
                                     request.sampling(assistant.config.sampling), cancel,
                                     to_program=True)
            model = assistant.model_version
        try:
            on_start(model)
            while True:
                with served.access():  # the last step stores the reply
                    piece = next(turn.pieces, None)
                if piece is None:
                    break
                on_piece(piece)
        finally:
            with served.access():  # after an error: end the generation, free the model
                getattr(turn.pieces, "close", lambda: None)()
        reason = str(getattr(assistant.generator, "finish_reason", "") or "stop")
        usage = _usage(assistant, turn.text, turn.explanation.tokens)
    metrics.observe_turn(turn.timings, time.perf_counter() - started)
    return TurnResult(turn.text, "length" if reason == "length" else "stop", usage, {
        "session": session, "message_id": turn.reply_message_id,
        "explanation": turn.explanation.to_dict()})


def _completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def _chunk(cid: str, created: int, model: str, delta: dict[str, Any],
           finish: str | None = None, **extra: Any) -> bytes:
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            **extra}
    return b"data: " + _json_bytes(body) + b"\n\n"


_DONE = b"data: [DONE]\n\n"


async def _stream_turn(served: ServedPod, metrics: ApiMetrics, request: ChatRequest,
                       session_hint: str | None) -> StreamingResponse:
    """Start the turn in its own thread; stream its pieces as server-sent events."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    cancel = threading.Event()

    def put(kind: str, value: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
        except RuntimeError:  # the server stopped: nobody is listening
            cancel.set()

    def produce() -> None:
        try:
            result = run_turn(served, metrics, request, session_hint, cancel,
                              lambda model: put("start", model), lambda p: put("piece", p))
            put("end", result)
        except Exception as exc:
            put("error", exc)

    threading.Thread(target=produce, name="covey-api-turn", daemon=True).start()
    try:
        kind, value = await queue.get()
    except BaseException:  # the client went away before the first piece
        cancel.set()
        raise
    if kind == "error":
        raise value
    return StreamingResponse(_events(queue, str(value), cancel), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def _events(queue: asyncio.Queue[tuple[str, Any]], model: str,
                  cancel: threading.Event) -> AsyncIterator[bytes]:
    cid, created = _completion_id(), int(time.time())
    finished = False
    try:
        yield _chunk(cid, created, model, {"role": "assistant", "content": ""})
        while not finished:
            kind, value = await queue.get()
            if kind == "piece":
                yield _chunk(cid, created, model, {"content": value})
            elif kind == "end":
                result: TurnResult = value
                yield _chunk(cid, created, model, {}, result.finish_reason, usage=result.usage,
                             covey=result.covey)
                finished = True
            elif kind == "error":
                status, body = _error_for(value)
                _log.warning("a streamed turn failed (%d): %s", status, body["error"]["code"])
                yield b"data: " + _json_bytes(body) + b"\n\n"
                finished = True
        yield _DONE
    finally:
        if not finished:  # the client went away: stop generating (the partial reply is kept)
            cancel.set()


# -- error mapping ----------------------------------------------------------------------------


def _error_for(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """The status and OpenAI-style body of an error a handler raised."""
    from covey.models import BackendUnavailableError

    message = str(exc)
    if isinstance(exc, ApiPodLockedError):
        return 503, _error_body(message, "service_unavailable", "pod_locked")
    if isinstance(exc, PodLockedError):
        return 503, _error_body(message, "service_unavailable", "pod_busy")
    if isinstance(exc, WrongPassphraseError):
        return 401, _error_body(message, "authentication_error", "wrong_passphrase")
    if isinstance(exc, InvalidInputError):
        return 400, _error_body(message, "invalid_request_error", "invalid_value")
    if isinstance(exc, BackendUnavailableError):
        return 502, _error_body(message, "api_error", "generator_unavailable")
    if isinstance(exc, RemoteConsentError):
        return 403, _error_body(message, "permission_error", "consent_required")
    if isinstance(exc, CoveyError):
        return 500, _error_body(message, "api_error", type(exc).__name__)
    _log.error("internal error in a turn", exc_info=exc)
    return 500, _error_body("internal error; details are in the pod's log", "api_error",
                            "internal_error")


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(CoveyError)
    async def covey_error(_: Request, exc: CoveyError) -> Response:
        status, body = _error_for(exc)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, str(exc.detail), code=code)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return _error(400, "the request body is not valid JSON", code="invalid_json")
        # loc and msg only: `input` would echo the user's text back into logs and clients.
        where = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: "
                          f"{e.get('msg', 'invalid')}" for e in errors[:5])
        return _error(422, where, code="invalid_body")


# -- the app ----------------------------------------------------------------------------------


def create_app(pod_home: Path, passphrase: str | None, generator: str | None = None,
               url: str | None = None) -> FastAPI:
    """The local API for the pod at ``pod_home``, unlocked with ``passphrase`` (None: locked).

    The bearer token is read from ``pod_home/api.token``, created there on first use.

    Raises:
        WrongPassphraseError, PodNotFoundError, ...: the pod cannot be unlocked.
    """
    pod_home = pod_home.expanduser().absolute()
    if not Pod.exists(pod_home):
        raise PodNotFoundError(pod_home)
    served = ServedPod(pod_home, generator, url)
    if passphrase is not None:
        served.unlock(passphrase)
    token = ensure_token(pod_home)
    metrics = ApiMetrics.create()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await anyio.to_thread.run_sync(served.close)

    app = FastAPI(title="covey pod", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.served = served
    app.state.metrics = metrics
    _install_error_handlers(app)
    _add_openai_routes(app, served, metrics)
    _add_covey_routes(app, served, metrics)
    app.add_middleware(_Gate, served=served, metrics=metrics, token=token, router=app.router)
    return app


def _add_openai_routes(app: FastAPI, served: ServedPod, metrics: ApiMetrics) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(
        body: ChatRequest,
        session: str | None = Header(default=None, alias=SESSION_HEADER, max_length=64),
    ) -> Response:
        if body.stream:
            return await _stream_turn(served, metrics, body, session)
        return JSONResponse(await anyio.to_thread.run_sync(_whole_turn, served, metrics, body,
                                                           session))

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        with served.access() as (pod, assistant):
            created = _epoch(pod.meta("created_at"))
            return {"object": "list", "data": [{"id": assistant.model_version,
                                                "object": "model", "created": created,
                                                "owned_by": "covey"}]}

    @app.post("/v1/embeddings")
    def embeddings(body: EmbeddingRequest) -> dict[str, Any]:
        texts = body.texts()
        with served.access() as (_, assistant):
            vectors = np.asarray(served.embedder.embed(texts), dtype="<f4")  # (n, 384)
            tokens = sum(assistant.count(t) for t in texts)
        data = [{"object": "embedding", "index": i,
                 "embedding": (base64.b64encode(v.tobytes()).decode()
                               if body.encoding_format == "base64" else v.tolist())}
                for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": EMBEDDING_MODEL,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _whole_turn(served: ServedPod, metrics: ApiMetrics, body: ChatRequest,
                session: str | None) -> dict[str, Any]:
    """A turn as one ``chat.completion`` object."""
    model: list[str] = []
    result = run_turn(served, metrics, body, session, threading.Event(), model.append,
                      lambda _: None)
    return {"id": _completion_id(), "object": "chat.completion", "created": int(time.time()),
            "model": model[0],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "logprobs": None, "finish_reason": result.finish_reason}],
            "usage": result.usage, "covey": result.covey}


def _epoch(stamp: str) -> int:
    try:
        return int(datetime.fromisoformat(stamp).timestamp())
    except ValueError:
        return 0


def _add_covey_routes(app: FastAPI, served: ServedPod, metrics: ApiMetrics) -> None:
    @app.post("/covey/feedback")
    def feedback(body: FeedbackRequest) -> dict[str, Any]:
        correction = UserText(body.correction) if body.correction is not None else None
        with served.access() as (pod, _):
            result = give_feedback(pod, rating=body.rating, correction=correction,
                                   message_id=body.message_id)
        return dataclasses.asdict(result)

    @app.get("/covey/memories")
    def memories(query: str | None = Query(default=None, max_length=2048),
                 limit: int = Query(default=50, ge=1, le=1000)) -> dict[str, Any]:
        with served.access() as (pod, _):
            if query is None:
                rows = [m.to_dict() for m in pod.memories.all(limit=limit)]
            else:
                rows = [{**h.memory.to_dict(), "score": round(h.score, 4)}
                        for h in pod.memories.recall(UserText(query), k=limit)]
        return {"object": "list", "data": rows}

    @app.delete("/covey/memories/{memory_id}")
    def forget_memory(memory_id: int) -> Response:
        with served.access() as (pod, _):
            found = pod.memories.forget(memory_id)
        if not found:
            return _error(404, f"no memory #{memory_id}", code="memory_not_found")
        return JSONResponse({"id": memory_id, "forgotten": True})

    @app.post("/covey/lock")
    def lock() -> Response:
        body = _json_bytes({"locked": True})
        if not served.lock(last_response=("/covey/lock", 200, len(body))):
            raise ApiPodLockedError()
        return Response(body, media_type="application/json")

    @app.post("/covey/unlock")
    def unlock(body: UnlockRequest) -> dict[str, Any]:
        served.unlock(body.passphrase)
        return {"locked": False}

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
