"""Text generation: sampling, streaming, stop sequences, cancellation, and the backends.

Generators are chosen by name from :data:`GENERATORS`:

- ``onnx`` (default): the int8 ONNX model on ONNX Runtime, with a key/value cache;
- ``torch``: the fp32 torch model, the reference;
- ``openai``: any OpenAI-compatible server (Ollama, llama.cpp, vLLM) at a URL.

Every generator streams text pieces from ``stream_chat`` / ``stream_text`` and stops at
``max_tokens``, an end-of-turn token, a stop sequence, or when ``cancel`` is set.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import numpy as np

from covey.errors import CoveyError, InvalidInputError
from covey.models._tokenizer import ASSISTANT, BOS, EOS, SYSTEM, USER, ChatMessage, ChatTokenizer

__all__ = [
    "GENERATORS",
    "BackendUnavailableError",
    "Generator",
    "OnnxGenerator",
    "OpenAIGenerator",
    "RemoteRequest",
    "SamplingParams",
    "TorchGenerator",
    "create_generator",
]

_log = logging.getLogger(__name__)
# Tokens that end the assistant's turn: the next speaker's marker or end of sequence.
_END_OF_TURN = (EOS, USER, SYSTEM, ASSISTANT, BOS)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature=0`` is greedy decoding."""

    max_tokens: int = 64
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    repetition_penalty: float = 1.1
    stop: tuple[str, ...] = field(default=())
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.max_tokens <= 4096:
            raise ValueError("max_tokens must be in 1..4096")
        if not 0.0 <= self.temperature <= 10.0:
            raise ValueError("temperature must be in [0, 10]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0 disables it)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.repetition_penalty < 1.0:
            raise ValueError("repetition_penalty must be >= 1")
        if any(not s for s in self.stop):
            raise ValueError("stop sequences must not be empty")


class BackendUnavailableError(CoveyError):
    """A generation backend cannot be reached; the pod keeps working without it."""

    exit_code = 9

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"the generator at {where} is unreachable ({reason})")


class Generator(Protocol):
    """What every backend offers."""

    name: str

    def stream_chat(self, messages: Sequence[ChatMessage], params: SamplingParams,
                    cancel: threading.Event | None = None) -> Iterator[str]:
        """Stream the assistant's reply to a chat."""
        ...

    def stream_text(self, prompt: str, params: SamplingParams,
                    cancel: threading.Event | None = None) -> Iterator[str]:
        """Stream a raw continuation of ``prompt``."""
        ...


def pick_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
               history: Sequence[int]) -> int:
    """Choose the next token from one row of logits (V,)."""
    logits = logits.astype(np.float64, copy=True)
    if params.repetition_penalty > 1.0 and history:
        seen = np.unique(np.asarray(history))
        # CTRL's penalty: shrink positive logits, push negative ones further down.
        vals = logits[seen]
        logits[seen] = np.where(vals > 0, vals / params.repetition_penalty,
                                vals * params.repetition_penalty)
    if params.temperature == 0.0:
        return int(np.argmax(logits))
    logits /= params.temperature
    if 0 < params.top_k < len(logits):
        kth = np.partition(logits, -params.top_k)[-params.top_k]
        logits[logits < kth] = -np.inf
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs)
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, params.top_p) + 1)]
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    return int(rng.choice(len(probs), p=probs))


class _StopScanner:
    """Releases text as it is generated, holding back what may start a stop sequence."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.text = ""
        self.sent = 0
        self.stopped = False

    def feed(self, full_text: str) -> str:
        self.text = full_text
        for stop in self.stops:
            at = self.text.find(stop, max(0, self.sent - len(stop)))
            if at != -1:
                self.text = self.text[:at]
                self.stopped = True
        hold = 0 if self.stopped else max(
            (n for s in self.stops for n in range(len(s) - 1, 0, -1)
             if self.text.endswith(s[:n])), default=0)
        end = max(self.sent, len(self.text) - hold)
        piece, self.sent = self.text[self.sent:end], end
        return piece

    def flush(self) -> str:
        piece, self.sent = self.text[self.sent:], len(self.text)
        return piece


StepFn = Callable[[np.ndarray, Any], tuple[np.ndarray, Any]]  # (ids (1,T), cache) -> logits


@dataclass(frozen=True)
class _Prefix:
    """The token ids a generator last read, and their key/value cache."""

    ids: list[int]
    cache: Any  # [k0, v0, k1, v1, ...], each (1, heads, len(ids), head size)
    adapter: int  # the adapter the cache was computed with


def _head(cache: Any, length: int) -> Any:
    """The first ``length`` positions of one cache tensor (numpy or torch)."""
    part = cache[:, :, :length]
    return np.ascontiguousarray(part) if isinstance(part, np.ndarray) else part.contiguous()


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


class _LocalGenerator:
    """The decoding loop shared by the on-device backends.

    It keeps the key/value cache of the last sequence it read (prompt and reply). A chat
    prompt repeats most of the previous one (system text, preferences, earlier turns),
    so the next prompt reads only the tokens after the longest common prefix: prefix
    caching, as llama.cpp and vLLM do. The cache is dropped when the adapter changes.
    """

    name = "local"
    context = 256

    def __init__(self, tokenizer: ChatTokenizer) -> None:
        self.tokenizer = tokenizer
        self.finish_reason = ""
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}
        self._prefix: _Prefix | None = None

    def _step(self, ids: np.ndarray, cache: Any) -> tuple[np.ndarray, Any]:
        raise NotImplementedError

    def forget_cache(self) -> None:
        """Drop the kept prefix cache: the token ids and keys and values of the last
        sequence read (after the user erases something it may have held)."""
        self._prefix = None

    def _adapter(self) -> int:
        """A number that changes whenever the weights in use change."""
        return 0

    def _prefill(self, ids: list[int]) -> tuple[np.ndarray, Any, int]:
        """Logits and cache after ``ids``, reading only what the kept prefix lacks;
        returns (logits, cache, tokens taken from the kept cache)."""
        kept, reuse = self._prefix, 0
        if kept is not None and kept.adapter == self._adapter():
            reuse = min(_common_prefix(kept.ids, ids), len(ids) - 1)  # one token is read
        if reuse > 0 and kept is not None:
            cache = [_head(c, reuse) for c in kept.cache]
            logits, cache = self._step(np.asarray([ids[reuse:]], dtype=np.int64), cache)
        else:
            logits, cache = self._step(np.asarray([ids], dtype=np.int64), None)
        return logits, cache, reuse

    def prime(self, messages: Sequence[ChatMessage]) -> int:
        """Read the opening of a coming chat prompt into the prefix cache, so that the
        prompt, when it comes, reads only what follows it. Returns the tokens read."""
        ids = self.tokenizer.render(messages, reply=False)
        if len(ids) >= self.context // 2:  # the prompt would be cut from the left
            return 0
        adapter = self._adapter()
        _, cache, reuse = self._prefill(ids)
        self._prefix = _Prefix(ids, cache, adapter)
        return len(ids) - reuse

    def stream_chat(self, messages: Sequence[ChatMessage], params: SamplingParams,
                    cancel: threading.Event | None = None) -> Iterator[str]:
        """Stream the assistant's reply to a chat."""
        return self._stream(self.tokenizer.render(messages), params, cancel, chat=True)

    def stream_text(self, prompt: str, params: SamplingParams,
                    cancel: threading.Event | None = None) -> Iterator[str]:
        """Stream a raw continuation of ``prompt``."""
        return self._stream(self.tokenizer.encode(prompt), params, cancel, chat=False)

    def _fit(self, ids: list[int], params: SamplingParams) -> list[int]:
        budget = self.context - min(params.max_tokens, self.context // 2)
        if len(ids) > budget:
            _log.warning("prompt of %d tokens truncated from the left to %d", len(ids), budget)
            ids = ids[-budget:]
        return ids

    def _stream(self, ids: list[int], params: SamplingParams, cancel: threading.Event | None,
                chat: bool) -> Iterator[str]:
        ids = self._fit(ids, params)
        rng = np.random.default_rng(params.seed)
        scanner = _StopScanner(params.stop)
        out: list[int] = []
        fed = 0  # how many tokens of ``out`` the cache holds
        self.finish_reason = "length"
        adapter = self._adapter()
        logits, cache, reuse = self._prefill(ids)
        self.usage = {"prompt_tokens": len(ids), "completion_tokens": 0, "cached_tokens": reuse}
        try:
            while len(out) < params.max_tokens:
                if cancel is not None and cancel.is_set():
                    self.finish_reason = "cancelled"
                    break
                token = pick_token(logits[0, -1], params, rng, ids[-64:] + out)
                if (chat and token in _END_OF_TURN) or (not chat and token == EOS):
                    self.finish_reason = "stop"
                    break
                out.append(token)
                self.usage["completion_tokens"] = len(out)
                text = self.tokenizer.decode(out)
                # A byte-level token can end inside a UTF-8 character: wait for the rest.
                if not text.endswith("\ufffd"):
                    piece = scanner.feed(text)
                    if piece:
                        yield piece
                    if scanner.stopped:
                        self.finish_reason = "stop"
                        return
                if len(ids) + len(out) >= self.context:
                    break
                logits, cache = self._step(np.asarray([[token]], dtype=np.int64), cache)
                fed = len(out)
            tail = scanner.flush()
            if tail:
                yield tail
        finally:  # also when the reader stops early: what was read stays reusable
            self._prefix = _Prefix(ids + out[:fed], cache, adapter)


class OnnxGenerator(_LocalGenerator):
    """The int8 ONNX model on ONNX Runtime (what pods run)."""

    name = "onnx"

    def __init__(self, lm: Any, tokenizer: ChatTokenizer, context: int) -> None:
        super().__init__(tokenizer)
        self.lm = lm
        self.context = context

    def set_adapter(self, tensors: dict[str, np.ndarray]) -> None:
        """Apply a LoRA adapter from the next token on (no restart)."""
        self.lm.set_adapter(tensors)

    def _adapter(self) -> int:
        return int(self.lm.adapter_version)

    def _step(self, ids: np.ndarray, cache: Any) -> tuple[np.ndarray, Any]:
        return self.lm.step(ids, cache)


class TorchGenerator(_LocalGenerator):
    """The fp32 torch model: the reference backend."""

    name = "torch"

    def __init__(self, model: Any, tokenizer: ChatTokenizer) -> None:
        super().__init__(tokenizer)
        self.model = model.eval()
        self.context = model.cfg.context

    def _step(self, ids: np.ndarray, cache: Any) -> tuple[np.ndarray, Any]:
        import torch

        with torch.inference_mode():
            out = self.model(torch.from_numpy(ids), *(cache or ()))
        return out[0].numpy(), out[1:]


@dataclass(frozen=True)
class RemoteRequest:
    """One request the ``openai`` generator is about to send: where, and its exact body."""

    origin: str  # scheme://host[:port], never credentials
    host: str  # lower-case host name or address, as in the URL
    route: str  # /v1/chat/completions or /v1/completions
    body: bytes  # the bytes sent, as sent


class OpenAIGenerator:
    """Any OpenAI-compatible server. Memory and feedback stay in the pod, but each prompt,
    with what it recalled, goes to the server: the pod gates and audits that egress
    (``covey.device``), which is why a request is built (:meth:`chat_request`) apart
    from being sent (:meth:`send`)."""

    name = "openai"

    def __init__(self, base_url: str, model: str = "default", api_key: str | None = None,
                 timeout: float = 60.0) -> None:
        parts = urlsplit(base_url)
        try:
            port = f":{parts.port}" if parts.port else ""
        except ValueError:  # a port that is not a number in 0..65535
            port = "?"
        if parts.scheme not in ("http", "https") or not parts.hostname or port == "?":
            raise InvalidInputError(f"the openai generator needs an http(s) URL, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.host = parts.hostname  # urlsplit lower-cases it and drops IPv6 brackets
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.origin = f"{parts.scheme}://{host}{port}"
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.finish_reason = ""

    def _request(self, route: str, body: dict[str, Any]) -> RemoteRequest:
        payload = json.dumps({**body, "stream": True}, ensure_ascii=False).encode()
        return RemoteRequest(self.origin, self.host, route, payload)

    def chat_request(self, messages: Sequence[ChatMessage], params: SamplingParams
                     ) -> RemoteRequest:
        """The ``/v1/chat/completions`` request for ``messages``, not yet sent."""
        return self._request("/v1/chat/completions", {
            **self._body(params),
            "messages": [{"role": m.role, "content": m.content} for m in messages]})

    def text_request(self, prompt: str, params: SamplingParams) -> RemoteRequest:
        """The ``/v1/completions`` request for ``prompt``, not yet sent."""
        return self._request("/v1/completions", {**self._body(params), "prompt": prompt})

    def send(self, request: RemoteRequest, cancel: threading.Event | None = None
             ) -> Iterator[str]:
        """Send ``request`` (its body byte for byte) and stream the reply's pieces.

        No proxy from the environment is used: the bytes go to the host the request
        names, the one the pod audits and asked consent for.

        Raises:
            BackendUnavailableError: the server cannot be reached or answers badly.
        """
        import httpx

        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        chat = request.route == "/v1/chat/completions"
        try:
            with httpx.stream("POST", f"{self.base_url}{request.route}", content=request.body,
                              headers=headers, timeout=self.timeout,
                              trust_env=False) as response:
                if response.status_code != 200:
                    raise BackendUnavailableError(self.base_url, f"HTTP {response.status_code}")
                yield from self._events(response.iter_lines(), cancel,
                                        _chat_piece if chat else _text_piece)
        except httpx.HTTPError as exc:
            raise BackendUnavailableError(self.base_url, type(exc).__name__) from None

    def _events(self, lines: Iterator[str], cancel: threading.Event | None,
                pick: Callable[[dict[str, Any]], str]) -> Iterator[str]:
        self.finish_reason = "length"
        for line in lines:
            if cancel is not None and cancel.is_set():
                self.finish_reason = "cancelled"
                return
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            try:
                choice = json.loads(data)["choices"][0]
            except (ValueError, KeyError, IndexError, TypeError):
                raise BackendUnavailableError(self.base_url, "malformed stream event") from None
            piece = pick(choice)
            if piece:
                yield piece
            if choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])

    def _body(self, params: SamplingParams) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": params.max_tokens,
                                "temperature": params.temperature, "top_p": params.top_p}
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        return body

    def stream_chat(self, messages: Sequence[ChatMessage], params: SamplingParams,
                    cancel: threading.Event | None = None) -> Iterator[str]:
        """Stream a reply from ``/v1/chat/completions``."""
        return self.send(self.chat_request(messages, params), cancel)

    def stream_text(self, prompt: str, params: SamplingParams,
                    cancel: threading.Event | None = None) -> Iterator[str]:
        """Stream a continuation from ``/v1/completions``."""
        return self.send(self.text_request(prompt, params), cancel)


def _chat_piece(choice: dict[str, Any]) -> str:
    return str((choice.get("delta") or {}).get("content") or "")


def _text_piece(choice: dict[str, Any]) -> str:
    return str(choice.get("text") or "")


def _onnx(**options: Any) -> OnnxGenerator:
    from covey.models._runtime import load_onnx_generator

    return load_onnx_generator(**options)


def _torch(**options: Any) -> TorchGenerator:
    from covey.models._runtime import load_torch_generator

    return load_torch_generator(**options)


GENERATORS: dict[str, Callable[..., Any]] = {
    "onnx": _onnx,
    "torch": _torch,
    "openai": OpenAIGenerator,
}


def create_generator(name: str = "onnx", **options: Any) -> Generator:
    """A generator by name (``onnx``, ``torch`` or ``openai``).

    Raises:
        InvalidInputError: an unknown name.
    """
    if name not in GENERATORS:
        raise InvalidInputError(f"unknown generator {name!r}; known: {', '.join(GENERATORS)}")
    generator: Generator = GENERATORS[name](**options)
    return generator
