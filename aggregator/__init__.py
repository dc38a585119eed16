"""The aggregator: federated rounds, the DP-FedAvg strategy, the signed model registry,
the Flower ServerApp and deployment.

Public surface (imported when first used, so ``import covey.aggregator`` loads no Flower):
    run_federated, RunConfig, Transport   a run's rounds over any transport
    FlowerTransport                       the transport of a real federation
    PodReply, PodUpdate, aggregate        what pods answer, and the strategy's step
    Registry                              signed model versions
    AggregatorHome                        certificates, keys and processes of a deployment
    AdapterEvaluator, adapter_tally       held-out evaluation of a version
    run_audit                             a run record's facts for its audit report
"""

from typing import TYPE_CHECKING, Any

from covey._lazy import lazy_attribute

# Imported when first used, so that importing the package stays light.
_LAZY = {
    "AdapterEvaluator": "_evaluation",
    "AggregatorHome": "_deploy",
    "FlowerTransport": "_serverapp",
    "PodReply": "_rounds",
    "PodUpdate": "_strategy",
    "Registry": "_registry",
    "RunConfig": "_rounds",
    "Transport": "_rounds",
    "adapter_tally": "_evaluation",
    "aggregate": "_strategy",
    "run_audit": "_run_audit",
    "run_federated": "_rounds",
}

if TYPE_CHECKING:
    from covey.aggregator._deploy import AggregatorHome as AggregatorHome
    from covey.aggregator._evaluation import AdapterEvaluator as AdapterEvaluator
    from covey.aggregator._evaluation import adapter_tally as adapter_tally
    from covey.aggregator._registry import Registry as Registry
    from covey.aggregator._rounds import PodReply as PodReply
    from covey.aggregator._rounds import RunConfig as RunConfig
    from covey.aggregator._rounds import Transport as Transport
    from covey.aggregator._rounds import run_federated as run_federated
    from covey.aggregator._run_audit import run_audit as run_audit
    from covey.aggregator._serverapp import FlowerTransport as FlowerTransport
    from covey.aggregator._strategy import PodUpdate as PodUpdate
    from covey.aggregator._strategy import aggregate as aggregate


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _LAZY, name, globals())


__all__ = sorted(_LAZY)
