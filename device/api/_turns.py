"""Chat turns through the API: one ``chat.completion``, or server-sent events.

A chat turn is the pod's own: only the last user message of ``messages`` is used as
the turn text; the context comes from the pod's memory (recent turns, memories,
preferences). The session is the body's ``user`` or the ``X-Covey-Session`` header
(created when new), else the pod's last session. The reply carries an extra field
``covey: {session, message_id, explanation}``; when streaming, in the last chunk.

A turn runs in a thread of its own; it holds the store only to start and to finish
(see :mod:`covey.device.api._served`), never while the model generates.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse

from covey.device.api._errors import error_for
from covey.device.api._metrics import ApiMetrics
from covey.device.api._schemas import ChatRequest, json_bytes
from covey.device.api._served import ServedPod
from covey.device.assistant._chat import Assistant
from covey.errors import InvalidInputError
from covey.privacy import UserText

__all__ = ["SESSION_HEADER", "TurnResult", "run_turn", "stream_turn", "whole_turn"]

SESSION_HEADER = "X-Covey-Session"
_SESSION_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_DONE = b"data: [DONE]\n\n"
_log = logging.getLogger(__name__)


@dataclasses.dataclass
class TurnResult:
    """A finished turn, as the API reports it."""

    text: str
    finish_reason: str
    usage: dict[str, Any]
    covey: dict[str, Any]


def _session(assistant: Assistant, requested: str | None) -> str:
    """The requested session (created when new), else the last one (created if none)."""
    if requested is None:
        return assistant.last_session() or assistant.new_session()
    if not _SESSION_ID.fullmatch(requested):
        raise InvalidInputError("a session id is 1 to 64 letters, digits or . _ : -")
    conversations = assistant.pod.conversations
    if not conversations.exists(requested):
        conversations.start(requested)
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

    The store is held to start the turn and to finish it, not while the model generates.
    After an error the turn is finished too: it stores no reply and frees the model.

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
            for piece in turn.pieces:
                on_piece(piece)
        finally:
            with served.access():
                turn.finish()
        reason = str(getattr(assistant.generator, "finish_reason", "") or "stop")
        usage = _usage(assistant, turn.text, turn.explanation.tokens)
    metrics.observe_turn(turn.timings, time.perf_counter() - started)
    return TurnResult(turn.text, "length" if reason == "length" else "stop", usage, {
        "session": session, "message_id": turn.reply_message_id,
        "explanation": turn.explanation.to_dict()})


def _completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def whole_turn(served: ServedPod, metrics: ApiMetrics, body: ChatRequest,
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


def _chunk(cid: str, created: int, model: str, delta: dict[str, Any],
           finish: str | None = None, **extra: Any) -> bytes:
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            **extra}
    return b"data: " + json_bytes(body) + b"\n\n"


async def stream_turn(served: ServedPod, metrics: ApiMetrics, request: ChatRequest,
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
                status, body = error_for(value)
                _log.warning("a streamed turn failed (%d): %s", status, body["error"]["code"])
                yield b"data: " + json_bytes(body) + b"\n\n"
                finished = True
        yield _DONE
    finally:
        if not finished:  # the client went away: stop generating (the partial reply is kept)
            cancel.set()
