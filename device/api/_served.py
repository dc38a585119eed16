"""The pod as the API serves it: locked or unlocked, shared by the server's threads.

Handlers run in a thread pool, but the SQLCipher connection (and the indexes in memory
beside it) is used by one thread at a time. Two locks, always taken in this order:

- ``turns``: one chat turn at a time, for its whole length. The model, its prefix cache
  and its usage counts are shared, and a turn's prompt must see the turn before it.
- ``access``: the store, for one step. A turn holds it twice: to start
  (:meth:`Assistant.respond`: the message stored, recall, the prompt) and to finish
  (:meth:`Turn.finish`: the reply stored in one transaction). While the model generates
  between the two, the turn touches no store, so other requests are answered meanwhile.

Locking the pod takes both, so it waits for a running turn, which can always finish.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from covey.device._pod import Pod
from covey.device.assistant._chat import Assistant, open_assistant
from covey.errors import CoveyError, InvalidInputError

__all__ = ["AUDIT_KIND", "AUDIT_PEER", "ApiPodLockedError", "ServedPod"]

AUDIT_KIND = "api.response"
AUDIT_PEER = "local-api"
_log = logging.getLogger(__name__)


class ApiPodLockedError(CoveyError):
    """The API was asked for the pod while it is locked (POST /covey/unlock opens it)."""

    exit_code = 5

    def __init__(self) -> None:
        super().__init__("the pod is locked")


class ServedPod:
    """The pod behind the API: locked or unlocked, its store used by one thread at a time."""

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
