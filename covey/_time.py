"""Timestamps as covey stores them: UTC, ISO 8601."""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["utc_timestamp"]


def utc_timestamp(timespec: str = "microseconds") -> str:
    """Now, in UTC, as ISO 8601 (``2026-12-03T08:01:46.123456+00:00``); run records and
    certificates use ``timespec="seconds"``."""
    return datetime.now(UTC).isoformat(timespec=timespec)
