"""The context orchestrator: one prompt, assembled under a token budget.

Each turn's prompt is built from five sources, each with its own share of the budget so
that none can crowd out the others: system text, the user's current preferences (graph
layer), memories retrieved for this message (vector + keyword layers), current context
events, and recent turns (temporal layer), newest first until their share runs out.
What was used is returned as an :class:`Explanation`, which `covey chat --explain` and
the API show, and which never leaves the pod except to the user.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from covey.models import ChatMessage

__all__ = ["Explanation", "PromptBudget", "PromptParts", "assemble", "opening"]

SYSTEM_TEXT = "You are a friendly assistant running on the user's own device."

Counter = Callable[[str], int]


@dataclass(frozen=True)
class PromptBudget:
    """Token shares of a prompt (the reply's tokens come on top)."""

    system: int = 24
    preferences: int = 40
    memories: int = 64
    context: int = 16
    turns: int = 48
    message: int = 64

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if value < 0:
                raise ValueError(f"budget {name} must be >= 0")

    @property
    def total(self) -> int:
        """The whole prompt budget."""
        return sum(self.__dict__.values())


@dataclass(frozen=True)
class PromptParts:
    """What the orchestrator may draw from, each list best first."""

    message: str
    preferences: Sequence[str] = ()
    memories: Sequence[tuple[int, str, float]] = ()  # (memory id, text, score)
    context: Sequence[str] = ()
    turns: Sequence[tuple[str, str]] = ()  # (role, text), newest first


@dataclass(frozen=True)
class Explanation:
    """Why the prompt looks as it does: what was used and what it cost."""

    memories: list[dict[str, Any]] = field(default_factory=list)
    preferences: list[str] = field(default_factory=list)
    context: list[str] = field(default_factory=list)
    turns: int = 0
    tokens: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    learned: list[str] = field(default_factory=list)
    safety: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return dict(self.__dict__)


def _take(items: Sequence[str], budget: int, count: Counter) -> tuple[list[str], int, int]:
    """Items in order while they fit; returns (kept, tokens used, dropped count)."""
    kept, used = [], 0
    for item in items:
        cost = count(item) + 1  # one token of separator
        if used + cost > budget:
            continue  # a shorter, lower-ranked item may still fit
        kept.append(item)
        used += cost
    return kept, used, len(items) - len(kept)


def _clip(text: str, budget: int, count: Counter) -> str:
    """The end of ``text`` that fits ``budget`` tokens (the latest words matter most)."""
    if count(text) <= budget:
        return text
    words = text.split()
    while words and count(" ".join(words)) > budget:
        words = words[max(1, len(words) // 8):]
    return " ".join(words)


@dataclass(frozen=True)
class _Opening:
    """The part of a prompt known before the message arrives."""

    messages: list[ChatMessage]
    preferences: list[str]
    pref_tokens: int
    pref_dropped: int
    turn_tokens: int
    turns: int


def _opening(preferences: Sequence[str], turns: Sequence[tuple[str, str]],
             budget: PromptBudget, count: Counter) -> _Opening:
    prefs, pref_tokens, pref_dropped = _take(preferences, budget.preferences, count)
    system = SYSTEM_TEXT
    if prefs:
        system += " About the user: " + "; ".join(prefs) + "."
    kept: list[ChatMessage] = []
    turn_tokens = 0
    for role, text in turns:
        cost = count(text) + 1
        if turn_tokens + cost > budget.turns:
            break
        kept.insert(0, ChatMessage(role, text))
        turn_tokens += cost
    return _Opening([ChatMessage("system", system), *kept], prefs, pref_tokens, pref_dropped,
                    turn_tokens, len(kept))


def opening(preferences: Sequence[str], turns: Sequence[tuple[str, str]],
            budget: PromptBudget, count: Counter) -> list[ChatMessage]:
    """The messages every prompt of the next turn starts with (system text with the
    preferences, then recent turns): what :func:`assemble` puts first, so a generator
    can read them into its prefix cache before the user's message arrives."""
    return _opening(preferences, turns, budget, count).messages


def assemble(parts: PromptParts, budget: PromptBudget, count: Counter
             ) -> tuple[list[ChatMessage], Explanation]:
    """The chat messages for the model and the explanation of what went in."""
    # What changes least comes first, so the generator's prefix cache covers it: system
    # text and preferences, then earlier turns; what this message recalled goes last.
    head = _opening(parts.preferences, parts.turns, budget, count)
    memory_texts = [text for _, text, _ in parts.memories]
    kept_memories, mem_tokens, mem_dropped = _take(memory_texts, budget.memories, count)
    context, ctx_tokens, ctx_dropped = _take(parts.context, budget.context, count)
    recalled = []
    if kept_memories:
        recalled.append("The user told you: " + " ".join(kept_memories))
    if context:
        recalled.append("Now: " + "; ".join(context) + ".")
    message = _clip(parts.message, budget.message, count)
    used_memories = [{"id": mid, "score": round(score, 4)}
                     for mid, text, score in parts.memories if text in kept_memories]
    explanation = Explanation(
        memories=used_memories, preferences=head.preferences, context=context,
        turns=head.turns,
        tokens={"system": count(SYSTEM_TEXT), "preferences": head.pref_tokens,
                "memories": mem_tokens, "context": ctx_tokens, "turns": head.turn_tokens,
                "message": count(message)},
        dropped={"preferences": head.pref_dropped, "memories": mem_dropped,
                 "context": ctx_dropped, "turns": len(parts.turns) - head.turns,
                 "message_tokens": count(parts.message) - count(message)},
    )
    notes = [ChatMessage("system", " ".join(recalled))] if recalled else []
    return [*head.messages, *notes, ChatMessage("user", message)], explanation
