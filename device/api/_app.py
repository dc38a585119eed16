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

Chat turns are in :mod:`._turns`, the gate every request passes (token, body size,
audit of every response) in :mod:`._gate`, error bodies in :mod:`._errors`.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from fastapi import FastAPI, Header, Query
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from covey.device._pod import Pod
from covey.device.api._auth import ensure_token
from covey.device.api._errors import error_response, install_error_handlers
from covey.device.api._gate import Gate
from covey.device.api._metrics import ApiMetrics
from covey.device.api._schemas import (
    ChatRequest,
    EmbeddingRequest,
    FeedbackRequest,
    UnlockRequest,
    json_bytes,
)
from covey.device.api._served import ApiPodLockedError, ServedPod
from covey.device.api._turns import SESSION_HEADER, stream_turn, whole_turn
from covey.device.assistant._feedback import give_feedback
from covey.errors import PodNotFoundError
from covey.privacy import UserText

__all__ = ["create_app"]

EMBEDDING_MODEL = "all-MiniLM-L6-v2"


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
    install_error_handlers(app)
    _add_openai_routes(app, served, metrics)
    _add_covey_routes(app, served, metrics)
    app.add_middleware(Gate, served=served, metrics=metrics, token=token, router=app.router)
    return app


def _add_openai_routes(app: FastAPI, served: ServedPod, metrics: ApiMetrics) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(
        body: ChatRequest,
        session: str | None = Header(default=None, alias=SESSION_HEADER, max_length=64),
    ) -> Response:
        if body.stream:
            return await stream_turn(served, metrics, body, session)
        return JSONResponse(await anyio.to_thread.run_sync(whole_turn, served, metrics, body,
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
            return error_response(404, f"no memory #{memory_id}", code="memory_not_found")
        return JSONResponse({"id": memory_id, "forgotten": True})

    @app.post("/covey/lock")
    def lock() -> Response:
        body = json_bytes({"locked": True})
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
