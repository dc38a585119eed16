"""Hybrid logical clocks (Kulkarni et al., 2014) for ordering edits across a user's pods.

A timestamp is (wall milliseconds, counter, node id). It never runs backwards on one
node, stays close to physical time, and orders causally related events correctly; the
node id breaks ties, so every two distinct timestamps compare. A remote timestamp more
than ``max_drift_ms`` ahead of the local clock is refused, so one pod with a wrong clock
cannot push every later edit of the others into the past.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["HLC", "ClockDriftError", "HybridClock"]

MAX_DRIFT_MS = 60_000


class ClockDriftError(ValueError):
    """A remote timestamp is too far ahead of this pod's clock."""


@dataclass(frozen=True, order=True)
class HLC:
    """One hybrid logical timestamp; ordered by (wall, counter, node)."""

    wall: int  # milliseconds since the epoch
    counter: int
    node: str

    def encode(self) -> str:
        """A string that sorts like the timestamp (fixed-width wall and counter)."""
        return f"{self.wall:013d}.{self.counter:06d}.{self.node}"

    @classmethod
    def decode(cls, text: str) -> HLC:
        """Parse :meth:`encode`'s form (raises ValueError)."""
        wall, counter, node = text.split(".", 2)
        if len(wall) != 13 or len(counter) != 6 or not node:
            raise ValueError(f"not a hybrid logical timestamp: {text!r}")
        return cls(int(wall), int(counter), node)


class HybridClock:
    """The clock of one node (thread-safe)."""

    def __init__(self, node: str, physical: Callable[[], int] | None = None,
                 max_drift_ms: int = MAX_DRIFT_MS) -> None:
        self.node = node
        self.physical = physical or (lambda: time.time_ns() // 1_000_000)
        self.max_drift_ms = max_drift_ms
        self.wall, self.counter = 0, 0
        self._lock = threading.Lock()

    def now(self) -> HLC:
        """A timestamp for a local event, later than every one seen so far."""
        with self._lock:
            pt = self.physical()
            if pt > self.wall:
                self.wall, self.counter = pt, 0
            else:
                self.counter += 1
            return HLC(self.wall, self.counter, self.node)

    def check(self, remote: HLC) -> None:
        """Raise ClockDriftError if ``remote`` is more than ``max_drift_ms`` ahead."""
        ahead = remote.wall - self.physical()
        if ahead > self.max_drift_ms:
            raise ClockDriftError(f"remote clock {ahead} ms ahead of ours "
                                  f"(limit {self.max_drift_ms} ms)")

    def observe(self, remote: HLC) -> HLC:
        """Advance past a received timestamp; the timestamp of the receive event.

        Raises:
            ClockDriftError: ``remote`` is more than ``max_drift_ms`` ahead.
        """
        with self._lock:
            pt = self.physical()
            if remote.wall - pt > self.max_drift_ms:
                raise ClockDriftError(f"remote clock {remote.wall - pt} ms ahead of ours "
                                      f"(limit {self.max_drift_ms} ms)")
            wall = max(self.wall, remote.wall, pt)
            if wall == self.wall == remote.wall:
                counter = max(self.counter, remote.counter) + 1
            elif wall == self.wall:
                counter = self.counter + 1
            elif wall == remote.wall:
                counter = remote.counter + 1
            else:
                counter = 0
            self.wall, self.counter = wall, counter
            return HLC(wall, counter, self.node)
