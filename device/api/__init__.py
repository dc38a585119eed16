"""The pod's local API (`covey serve`): OpenAI-compatible routes and covey's own.

    create_app                        the FastAPI app for a pod home
    ensure_token, TOKEN_FILE          the bearer token, in ``<pod home>/api.token``
    check_bind_host                   the addresses it may listen on (loopback, or TLS)
    ListenError, RemoteBindError,
    PlainRemoteError                  why it cannot listen
    ChatRequest, MAX_BODY_BYTES       what a chat request may hold

Modules: ``_auth`` (token, bind rules), ``_served`` (the pod and its locks),
``_schemas`` (request bodies), ``_turns`` (chat turns, streamed or whole), ``_gate``
(token, body limit and audit of every response), ``_errors``, ``_metrics``, ``_app``
(the routes).
"""

from __future__ import annotations

from covey.device.api._app import create_app
from covey.device.api._auth import (
    TOKEN_FILE,
    ListenError,
    PlainRemoteError,
    RemoteBindError,
    check_bind_host,
    ensure_token,
)
from covey.device.api._gate import MAX_BODY_BYTES
from covey.device.api._schemas import ChatRequest

__all__ = ["MAX_BODY_BYTES", "TOKEN_FILE", "ChatRequest", "ListenError", "PlainRemoteError",
           "RemoteBindError", "check_bind_host", "create_app", "ensure_token"]
