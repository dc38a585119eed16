"""Prompts sent to a model server (the ``openai`` generator): consent first, every
request audited.

A turn's prompt holds the user's preferences, recalled memories, context and recent
turns: sending it to a server is an egress like any other. So:

- a server on this machine's loopback (127.0.0.0/8, ::1, ``localhost``) needs no
  consent; any other host needs the user's consent, ``remote_generator:<host>`` for
  that host or ``remote_generator`` for any (``covey pod consent SCOPE --grant``).
  Without it the turn is refused in one line and nothing is sent. A host name is never
  resolved to decide: a name that resolves to the loopback today may not tomorrow;
- every request is written to the audit log before it is sent, as ``generator.request``
  to the host: the body's exact size, the route, and the kinds of data the prompt held
  with their counts (system text, preferences, memories, context lines, recent turns,
  the message), never the text. A request that then fails is still recorded: the
  log may overstate what left, never understate it.
"""

from __future__ import annotations

import ipaddress
import re
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from covey.device._pod import Pod
from covey.device.assistant._feedback import consented
from covey.device.assistant._orchestrator import Explanation
from covey.errors import CoveyError
from covey.models import ChatMessage, OpenAIGenerator, SamplingParams

__all__ = ["AUDIT_KIND", "REMOTE_GENERATOR", "RemoteConsentError", "RemoteGenerator",
           "host_scope", "is_consent_scope", "is_loopback", "prompt_kinds"]

REMOTE_GENERATOR = "remote_generator"  # the consent to send prompts to any host
AUDIT_KIND = "generator.request"
# A host as a URL names it: a DNS name, an IPv4 address, or an IPv6 address.
_HOST = re.compile(r"[a-z0-9]([a-z0-9.-]{0,252}[a-z0-9])?|[0-9a-f:.]{2,45}")


class RemoteConsentError(CoveyError):
    """A prompt would go to a model server off this machine without the user's consent."""

    exit_code = 12

    def __init__(self, host: str) -> None:
        super().__init__(f"refusing to send the prompt to {host}: it is not this machine's "
                         f"loopback and you have not consented (covey pod consent "
                         f"{host_scope(host)} --grant, or {REMOTE_GENERATOR} for any host)")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (as a URL names it) is this machine's loopback, by its letters
    alone: ``localhost``, 127.0.0.0/8, ::1 (or ::ffff:127.x.y.z)."""
    host = host.lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def host_scope(host: str) -> str:
    """The consent scope that allows prompts to ``host`` only."""
    return f"{REMOTE_GENERATOR}:{host.lower().strip('[]')}"


def is_consent_scope(scope: str) -> bool:
    """Whether ``scope`` is a consent scope: letters, digits and underscores, or
    ``remote_generator:<host>``."""
    name, _, host = scope.partition(":")
    if not name.replace("_", "").isalnum():
        return False
    return not host if name != REMOTE_GENERATOR else (not host or bool(_HOST.fullmatch(host)))


def prompt_kinds(explanation: Explanation) -> dict[str, int]:
    """What a prompt held, by kind and count (never the text)."""
    return {"system": 1, "preferences": len(explanation.preferences),
            "memories": len(explanation.memories), "context": len(explanation.context),
            "recent_turns": explanation.turns, "message": 1}


class RemoteGenerator:
    """The gate between a pod's turns and an ``openai`` generator's server."""

    def __init__(self, pod: Pod, generator: OpenAIGenerator) -> None:
        self.pod = pod
        self.generator = generator

    def allowed_by(self) -> str:
        """What lets prompts go to the server: ``loopback`` or the consent scope.

        Raises:
            RemoteConsentError: neither.
        """
        host = self.generator.host
        if is_loopback(host):
            return "loopback"
        for scope in (host_scope(host), REMOTE_GENERATOR):
            if consented(self.pod, scope):
                return scope
        raise RemoteConsentError(host)

    def stream_chat(self, messages: Sequence[ChatMessage], params: SamplingParams,
                    cancel: threading.Event | None, explanation: Explanation
                    ) -> Iterator[str]:
        """Check consent and audit the request now; the pieces returned send it and
        stream the reply (they touch the model server only, never the store).

        Raises:
            RemoteConsentError: the host needs a consent the user has not given.
            BackendUnavailableError: the server cannot be reached.
        """
        allowed = self.allowed_by()  # asked again: a consent may be withdrawn at any time
        request = self.generator.chat_request(messages, params)
        detail: dict[str, Any] = {"origin": request.origin, "route": request.route,
                                  "model": self.generator.model, "allowed_by": allowed,
                                  "prompt": prompt_kinds(explanation)}
        self.pod.audit(AUDIT_KIND, peer=request.host, nbytes=len(request.body), detail=detail)
        return self.generator.send(request, cancel)
