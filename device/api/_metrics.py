"""The API's Prometheus metrics: responses by route and status, chat latency by stage."""

from __future__ import annotations

import dataclasses

from prometheus_client import CollectorRegistry, Counter, Histogram

__all__ = ["ApiMetrics"]

_STAGES = ("store", "retrieve", "assemble", "first_token", "reply")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclasses.dataclass
class ApiMetrics:
    """Prometheus metrics of one app, in their own registry."""

    registry: CollectorRegistry
    requests: Counter
    stages: Histogram

    @classmethod
    def create(cls) -> ApiMetrics:
        """Fresh metrics."""
        registry = CollectorRegistry()
        return cls(
            registry,
            Counter("covey_api_requests", "API responses by route template and status.",
                    ["route", "status"], registry=registry),
            Histogram("covey_chat_stage_seconds",
                      "Chat turn latency by stage (store, retrieve, assemble, first_token, "
                      "reply) and for the whole request (total).",
                      ["stage"], registry=registry, buckets=_LATENCY_BUCKETS),
        )

    def observe_turn(self, timings: dict[str, float], total_s: float) -> None:
        """Record one chat turn's stage timings."""
        for stage in _STAGES:
            if f"{stage}_s" in timings:
                self.stages.labels(stage).observe(timings[f"{stage}_s"])
        self.stages.labels("total").observe(total_s)
