"""The redaction filter: user text never reaches a log, PII patterns are replaced."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from covey.privacy import RedactingFilter, UserText, redact


@pytest.mark.parametrize(("text", "gone", "marker"), [
    ("mail ana.silva+x@example.org now", "ana.silva", "<email>"),
    ("call +351 912 345 678 today", "912 345", "<phone>"),
    ("card 4111 1111 1111 1111 ok", "4111", "<number>"),
    ("from 192.168.10.20 port", "192.168", "<ip>"),
    ("key " + "ab" * 32, "abab", "<hex>"),
])
def test_patterns(text: str, gone: str, marker: str) -> None:
    out = redact(text)
    assert gone not in out
    assert marker in out


def test_ordinary_text_unchanged() -> None:
    text = "memory 12 added (kind fact, 31 chars) in 3 ms"
    assert redact(text) == text


@given(st.text(min_size=1, max_size=200))
def test_user_text_never_renders(secret: str) -> None:
    wrapped = UserText(secret)
    percent = "%s" % (wrapped,)  # noqa: UP031 (logging formats this way)
    for rendered in (str(wrapped), repr(wrapped), f"{wrapped}", percent):
        assert rendered == f"<user text: {len(secret)} chars>"


def test_filter_on_a_real_logger(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("covey.test.redact")
    caplog.handler.addFilter(RedactingFilter())
    with caplog.at_level(logging.INFO, logger="covey.test.redact"):
        logger.info("user said %s", UserText("my secret plan"))
        logger.info("contact %s", "bob@example.com")
        try:
            raise RuntimeError("failed for alice@example.com")
        except RuntimeError:
            logger.exception("boom")
    text = caplog.text
    assert "my secret plan" not in text
    assert "bob@example.com" not in text
    assert "alice@example.com" not in text
    assert "<user text: 14 chars>" in text
