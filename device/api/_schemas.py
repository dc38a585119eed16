"""The bodies the API reads: OpenAI's chat and embedding requests, and covey's own."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from covey.errors import InvalidInputError
from covey.models import SamplingParams

__all__ = ["ChatMessageIn", "ChatRequest", "EmbeddingRequest", "FeedbackRequest",
           "UnlockRequest", "json_bytes"]

MAX_EMBED_INPUTS = 256
MAX_EMBED_CHARS = 8192


def json_bytes(value: Any) -> bytes:
    """``value`` as compact UTF-8 JSON, as every response body is written."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


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
