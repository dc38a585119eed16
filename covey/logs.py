"""Logging set-up: every handler covey installs carries the redaction filter.

Warnings go to stderr; with a pod home, INFO and above also go to
``<home>/logs/covey.log`` (mode 0600). User text never reaches either: the caller hands
in privacy's redacting filter (the base sits below privacy, so it cannot import it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["CRASH_LOGGER", "configure", "log_file"]

CRASH_LOGGER = "covey.crash"

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_installed: list[logging.Handler] = []


class _BestEffortFileHandler(logging.FileHandler):
    """A log file that never gets in the user's way: when it cannot be written (a full
    disk, a removed folder) the record is dropped instead of printing a traceback."""

    def handleError(self, record: logging.LogRecord) -> None:
        return


def log_file(home: Path) -> Path:
    """Where a pod's log lives."""
    return home / "logs" / "covey.log"


def _open_log(path: Path) -> logging.Handler | None:
    """The pod's log file (mode 0600), or None when it cannot be created."""
    try:
        path.parent.mkdir(mode=0o700, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    except OSError:
        return None
    return _BestEffortFileHandler(path, encoding="utf-8")


def configure(home: Path | None = None, level: int = logging.INFO, *,
              redaction: Callable[[], logging.Filter]) -> None:
    """Install handlers on the root logger (replacing ones we installed before), each
    with a filter made by ``redaction`` (``covey.privacy.RedactingFilter``)."""
    root = logging.getLogger()
    for handler in _installed:
        root.removeHandler(handler)
        handler.close()
    _installed.clear()

    stderr = logging.StreamHandler()
    stderr.setLevel(logging.WARNING)
    # Crash reports carry a traceback: the log file gets it, the terminal gets one line.
    stderr.addFilter(lambda record: record.name != CRASH_LOGGER)
    stderr.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    _installed.append(stderr)

    if home is not None and home.is_dir():
        to_file = _open_log(log_file(home))
        if to_file is not None:
            to_file.setLevel(level)
            to_file.setFormatter(logging.Formatter(_FORMAT))
            _installed.append(to_file)

    for handler in _installed:
        handler.addFilter(redaction())
        root.addHandler(handler)
    root.setLevel(min(level, logging.WARNING))
