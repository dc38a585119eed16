"""Errors in OpenAI's shape, ``{"error": {"message", "type", "code"}}``, by exception.

400 a value the pod refuses (or malformed JSON), 401 no or wrong token (or, on unlock,
passphrase), 403 the generator's server is off this machine and the user has not
consented to sending it prompts (``consent_required``), 404 unknown route or memory,
413 a body over the size limit, 422 a body that does not fit the schema, 502 the
generator's server is unreachable, 503 the pod is locked (``pod_locked``) or its store
stayed busy (``pod_busy``).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from covey.device.api._served import ApiPodLockedError
from covey.device.assistant._egress import RemoteConsentError
from covey.errors import CoveyError, InvalidInputError, PodLockedError, WrongPassphraseError

__all__ = ["error_body", "error_for", "error_response", "install_error_handlers"]

_log = logging.getLogger(__name__)


def error_body(message: str, kind: str, code: str) -> dict[str, Any]:
    """An error as OpenAI writes it."""
    return {"error": {"message": message, "type": kind, "code": code}}


def error_response(status: int, message: str, kind: str = "invalid_request_error",
                   code: str = "invalid_request") -> JSONResponse:
    """An error response with ``status``."""
    return JSONResponse(error_body(message, kind, code), status_code=status)


def error_for(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """The status and OpenAI-style body of an error a handler raised."""
    from covey.models import BackendUnavailableError

    message = str(exc)
    if isinstance(exc, ApiPodLockedError):
        return 503, error_body(message, "service_unavailable", "pod_locked")
    if isinstance(exc, PodLockedError):
        return 503, error_body(message, "service_unavailable", "pod_busy")
    if isinstance(exc, WrongPassphraseError):
        return 401, error_body(message, "authentication_error", "wrong_passphrase")
    if isinstance(exc, InvalidInputError):
        return 400, error_body(message, "invalid_request_error", "invalid_value")
    if isinstance(exc, BackendUnavailableError):
        return 502, error_body(message, "api_error", "generator_unavailable")
    if isinstance(exc, RemoteConsentError):
        return 403, error_body(message, "permission_error", "consent_required")
    if isinstance(exc, CoveyError):
        return 500, error_body(message, "api_error", type(exc).__name__)
    _log.error("internal error in a turn", exc_info=exc)
    return 500, error_body("internal error; details are in the pod's log", "api_error",
                           "internal_error")


def install_error_handlers(app: FastAPI) -> None:
    """Answer covey's errors, HTTP errors and invalid bodies in OpenAI's shape."""

    @app.exception_handler(CoveyError)
    async def covey_error(_: Request, exc: CoveyError) -> Response:
        status, body = error_for(exc)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, str(exc.detail), code=code)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(400, "the request body is not valid JSON", code="invalid_json")
        # loc and msg only: `input` would echo the user's text back into logs and clients.
        where = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: "
                          f"{e.get('msg', 'invalid')}" for e in errors[:5])
        return error_response(422, where, code="invalid_body")
