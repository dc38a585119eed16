"""Disguises for the red-team measurement: each red-team prompt is also tried written the
ways people hide words from a filter (the safety filter is measured on them, never
trained on them).

Each evasion is a deterministic function of the text. The look-alike ones are written
by hand, as an attacker would, not taken from the table the filter folds with:
``cyrillic`` and ``greek`` swap the letters that have a look-alike in that script,
``lookalikes`` every letter that has one in Cyrillic, Greek or Armenian, so most words
have no Latin letter left.
"""

from __future__ import annotations

import re
from collections.abc import Callable

__all__ = ["EVASIONS", "FOLDED", "disguise"]

_ZWSP, _SHY = "\u200b", "\u00ad"
_CYRILLIC = str.maketrans("aceopxyACEOPXY", "асеорхуАСЕОРХУ")
_GREEK = str.maketrans("oivuyABEHIKMNOPTXYZ", "οινυγΑΒΕΗΙΚΜΝΟΡΤΧΥΖ")
_LOOKALIKES = str.maketrans("acdeghijnopqrsuvwxyABCEHIJKMOPSTXYZ",
                            "асԁеցһіјոорԛгѕսνԝхуАВСЕНІЈКМОРЅТХУΖ")


def _within_words(text: str, join: Callable[[str], str], shortest: int = 1) -> str:
    return re.sub(r"[A-Za-z]+", lambda m: join(m.group(0)) if len(m.group(0)) >= shortest
                  else m.group(0), text)


def _spaced(text: str) -> str:
    """Every letter apart, words two spaces apart: "h o w  d o  I"."""
    return "  ".join(" ".join(word) for word in text.split())


def _spaced_flat(text: str) -> str:
    """Every character one space apart, so nothing marks where words end."""
    return " ".join(text.replace(" ", ""))


def _fullwidth(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


EVASIONS: dict[str, Callable[[str], str]] = {
    "zero_width": lambda t: _within_words(t, lambda w: _ZWSP.join(w)),
    "soft_hyphen": lambda t: _within_words(t, lambda w: _SHY.join(w[i:i + 2] for i in
                                                                  range(0, len(w), 2))),
    "spaced": _spaced,
    "spaced_flat": _spaced_flat,
    "spaced_long_words": lambda t: _within_words(t, lambda w: " ".join(w), shortest=4),
    "dotted": lambda t: _within_words(t, lambda w: ".".join(w), shortest=3),
    "fullwidth": _fullwidth,
    "combining": lambda t: _within_words(t, lambda w: "".join(c + "\u0334" for c in w)),
    "cyrillic": lambda t: t.translate(_CYRILLIC),
    "greek": lambda t: t.translate(_GREEK),
    "lookalikes": lambda t: t.translate(_LOOKALIKES),
}
# The evasions the normalization is meant to undo: all of them.
FOLDED = tuple(EVASIONS)


def disguise(text: str, how: str) -> str:
    """``text`` written with the evasion ``how``."""
    return EVASIONS[how](text)
