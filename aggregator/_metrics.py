"""The aggregator's Prometheus endpoint: ``python -m covey.aggregator._metrics HOME PORT``.

Serves, on 127.0.0.1 only, the counters the ServerApp writes after every round into
``HOME/metrics.json``: rounds, participants, rejected and refused updates by reason,
round durations and the epsilon spent by the current run.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry

__all__ = ["AggregatorCollector", "serve"]


class AggregatorCollector(Collector):
    """Reads the aggregator home's counters at every scrape."""

    def __init__(self, home: Path) -> None:
        self.home = home

    def collect(self) -> Iterator[Metric]:
        from covey.aggregator._deploy import AggregatorError, AggregatorHome

        try:
            m = AggregatorHome(self.home).metrics()
        except AggregatorError:
            m = {}
        yield CounterMetricFamily("covey_rounds", "Federated rounds completed",
                                  value=m.get("rounds", 0))
        yield CounterMetricFamily("covey_participants", "Accepted pod updates, all rounds",
                                  value=m.get("participants", 0))
        yield GaugeMetricFamily("covey_round_participants", "Accepted updates, last round",
                                value=m.get("last_participants", 0))
        for name, key, text in (("covey_rejected_updates", "rejected",
                                 "Updates rejected by the aggregator, by reason"),
                                ("covey_refused_rounds", "refused",
                                 "Rounds pods refused, by reason")):
            family = CounterMetricFamily(name, text, labels=["reason"])
            for reason, n in sorted(dict(m.get(key, {})).items()):
                family.add_metric([reason], n)
            yield family
        seconds = list(m.get("round_seconds", []))
        yield SummaryMetricFamily("covey_round_duration_seconds", "Wall time of a round",
                                  count_value=len(seconds), sum_value=sum(seconds))
        yield GaugeMetricFamily("covey_epsilon_spent", "Epsilon spent by the current run",
                                value=m.get("epsilon", 0.0))


def serve(home: Path, port: int) -> None:
    """Serve until killed."""
    from prometheus_client import start_http_server

    registry = CollectorRegistry()
    registry.register(AggregatorCollector(home))
    start_http_server(port, addr="127.0.0.1", registry=registry)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    serve(Path(sys.argv[1]), int(sys.argv[2]))
