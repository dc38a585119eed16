"""Facts and preferences a user states in chat, found by patterns.

A tiny on-device model cannot be trusted to decide what to remember, so remembering is
rule-based and explainable: each pattern yields a :class:`Fact` (subject, relation,
value, kind) that says exactly what will be stored and why. Relations marked
``functional`` hold one value at a time ("my sister is Ana" then "my sister is Rita":
the newer replaces the older); likes and dislikes of the same thing replace each other.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["Fact", "extract_facts"]

_VALUE = r"([^.!?,;\n]{1,60}?)"
_END = r"\s*(?:[.!?,;]|$|\s(?:and|but|because|so)\s)"


@dataclass(frozen=True)
class Fact:
    """One thing learned about the user."""

    relation: str  # e.g. "sister", "lives_in", "likes"
    value: str
    kind: str  # "fact" or "preference"
    functional: bool  # a new value replaces the old one
    sentence: str  # how the memory reads: the user's own words, tidied

    @property
    def key(self) -> tuple[str, str]:
        """What a newer fact with the same key replaces."""
        return (self.relation, "") if self.functional else ("taste", self.value.lower())


# Words about time at the end of a value ("I hate spicy food now") are not part of it.
_TIME_TAIL = re.compile(r"(?:\s+(?:now|anymore|any more|these days|nowadays|again|lately|"
                        r"too|as well|a lot|so much|very much))+$", re.I)


def _tidy(value: str) -> str:
    return _TIME_TAIL.sub("", re.sub(r"\s+", " ", value).strip(" '\""))


_PATTERNS: tuple[tuple[re.Pattern[str], str, str, bool, str], ...] = (
    (re.compile(rf"\bmy name is {_VALUE}{_END}", re.I), "name", "fact", True,
     "My name is {v}."),
    (re.compile(rf"\bcall me {_VALUE}{_END}", re.I), "name", "fact", True, "My name is {v}."),
    (re.compile(rf"\bmy ([a-z]+(?: [a-z]+)?)(?:'s name)? is {_VALUE}{_END}", re.I), "{r}",
     "fact", True, "My {r} is {v}."),
    (re.compile(rf"\bi live in {_VALUE}{_END}", re.I), "lives_in", "fact", True,
     "I live in {v}."),
    (re.compile(rf"\bi(?: am|'m) from {_VALUE}{_END}", re.I), "from", "fact", True,
     "I am from {v}."),
    (re.compile(rf"\bi work (?:at|for) {_VALUE}{_END}", re.I), "works_at", "fact", True,
     "I work at {v}."),
    (re.compile(rf"\bi work as {_VALUE}{_END}", re.I), "job", "fact", True,
     "I work as {v}."),
    (re.compile(rf"\bi(?: am|'m) allergic to {_VALUE}{_END}", re.I), "allergic_to", "fact",
     False, "I am allergic to {v}."),
    (re.compile(rf"\bi (?:really )?(?:hate|dislike|can't stand|do not like|don't like) "
                rf"{_VALUE}{_END}", re.I), "dislikes", "preference", False, "I dislike {v}."),
    (re.compile(rf"\bi (?:really )?(?:like|love|enjoy|prefer|adore) {_VALUE}{_END}", re.I),
     "likes", "preference", False, "I like {v}."),
)
# "my X is Y" where X is one of these says nothing lasting about the user.
_NOT_RELATIONS = {"day", "week", "question", "point", "guess", "bad", "pleasure", "fault",
                  "turn", "answer", "problem", "opinion", "mind", "head", "phone"}


def extract_facts(text: str) -> Iterator[Fact]:
    """The facts and preferences stated in a user's message, in the order they appear."""
    found: list[tuple[int, Fact]] = []
    taken: list[tuple[int, int]] = []
    for pattern, relation, kind, functional, template in _PATTERNS:
        for match in pattern.finditer(text):
            span = match.span()
            if any(a < span[1] and span[0] < b for a, b in taken):
                continue  # an earlier, more specific pattern already read this part
            groups = match.groups()
            rel = relation.format(r=groups[0].lower()) if "{r}" in relation else relation
            value = _tidy(groups[-1])
            if not value or rel in _NOT_RELATIONS or value.lower() in {"it", "that", "this"}:
                continue
            sentence = template.format(v=value, r=rel)
            found.append((span[0], Fact(rel.replace(" ", "_"), value, kind, functional,
                                        sentence)))
            taken.append(span)
    for _, fact in sorted(found, key=lambda item: item[0]):
        yield fact
