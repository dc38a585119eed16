"""PII redaction for anything that might reach a log.

Two layers. First, user text is never formatted into a log: values wrapped in
:class:`UserText` render as ``<user text: N chars>``. Second, whatever does reach a
record is scrubbed of the patterns that identify people or unlock data (e-mail
addresses, phone and card numbers, IP addresses, long hex strings such as keys).
"""

from __future__ import annotations

import logging
import re

__all__ = ["RedactingFilter", "UserText", "redact"]

# Order matters: the most specific patterns first, so a card number is not half-eaten
# by the phone pattern.
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"), "<email>"),
    (re.compile(r"\b[0-9a-fA-F]{32,}\b"), "<hex>"),
    (re.compile(r"\b(?:\d[ -]?){13,19}\b"), "<number>"),
    (re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b"), "<ip>"),
    (re.compile(r"(?<!\w)\+?\d[\d ().-]{7,}\d\b"), "<phone>"),
)


def redact(text: str) -> str:
    """Return ``text`` with e-mail addresses, numbers, IPs and key-like hex replaced."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class UserText(str):
    """A string that is the user's own words; it never renders inside a log record."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<user text: {len(self)} chars>"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)


def _scrub(value: object) -> object:
    if isinstance(value, UserText):
        return repr(value)
    if isinstance(value, str):
        return redact(value)
    return value


class RedactingFilter(logging.Filter):
    """Renders each record once, with user text hidden and PII patterns replaced."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            if isinstance(record.args, dict):
                record.args = {k: _scrub(v) for k, v in record.args.items()}
            else:
                record.args = tuple(_scrub(a) for a in record.args)
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = str(record.msg)
        record.msg = redact(message)
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            # The formatted traceback would carry exception messages verbatim.
            exc = record.exc_info[1]
            record.exc_text = redact(
                logging.Formatter().formatException(record.exc_info)
            ) if not isinstance(exc, KeyboardInterrupt) else None
            record.exc_info = None
        return True
