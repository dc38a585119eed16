"""The ``flower`` engine: Flower's Simulation Runtime (Ray) runs the same rounds.

The ServerApp runs the aggregator's ``run_federated`` over Flower's grid through the
deployment's own :class:`~covey.aggregator._serverapp.FlowerTransport`; every virtual
SuperNode runs a ClientApp that parses the round message as a real pod does
(:meth:`~covey.protocols.RoundMessage.from_dict`), trains with the same client function
as the ``fast`` engine (:func:`~covey.simulations._pool.train_pods`) and answers in
the real pod's reply format (:func:`~covey.device.federation._clientapp.reply_message`).

Flower gives virtual SuperNodes random node ids. So that a seed samples the same pods in
both engines, the ServerApp first asks every node which partition (pod) it holds, and
the run sees pods by their 1-based index, as in the ``fast`` engine.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from covey.aggregator import PodReply
from covey.protocols import REFUSAL_CODE, RoundMessage

__all__ = ["IndexedTransport", "client_app", "run_flower"]

_CLIENT: dict[str, Any] = {}  # per Ray actor: the population and the model, loaded once
_PARTITION = "partition-id"


def _client_state(cfg: Any) -> dict[str, Any]:
    key = repr(cfg)
    if _CLIENT.get("key") != key:
        import torch

        from covey.models import load_model
        from covey.simulations._population import population

        torch.set_num_threads(1)  # one actor per core
        model, tok, _ = load_model()
        _CLIENT.update(key=key, users=population(cfg), model=model, tok=tok)
    return _CLIENT


def client_app(cfg: Any) -> ClientApp:
    """The ClientApp of a simulated pod of the population of ``cfg``."""
    app = ClientApp()

    @app.query()
    def which_pod(msg: Message, context: Context) -> Message:
        index = int(context.node_config[_PARTITION]) + 1
        return Message(RecordDict({"pod": ConfigRecord({"index": index})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        from covey.device import RoundRequest, reply_message
        from covey.simulations._pool import train_pods

        try:
            request = RoundRequest.from_dict(dict(msg.content.config_records["round"]),
                                             peer="simulation")
        except (KeyError, TypeError, ValueError) as exc:
            return Message(Error(code=REFUSAL_CODE, reason=f"malformed round message "
                                 f"({type(exc).__name__})"), reply_to=msg)
        state = _client_state(cfg)
        node = int(context.node_config[_PARTITION]) + 1
        update, = train_pods(state["users"], state["model"], state["tok"], [node], request,
                             cfg.seed)
        # A simulated pod keeps no ledger: its spend is the run's, accounted by the server.
        return reply_message(msg, update, request.dp, str(request.version.get("id")))

    return app


class IndexedTransport:
    """Flower's grid seen by pod index (1..N) instead of random node ids."""

    def __init__(self, grid: Grid, pods: int, wait: float = 120.0) -> None:
        from covey.aggregator import FlowerTransport

        self.grid, self.inner, self.pods, self.wait = grid, FlowerTransport(grid), pods, wait
        self.to_node: dict[int, int] = {}
        self.to_index: dict[int, int] = {}

    def _discover(self) -> None:
        deadline = time.monotonic() + self.wait
        while len(self.to_node) < self.pods:
            fresh = [int(n) for n in self.grid.get_node_ids() if int(n) not in self.to_index]
            if fresh:
                asks = [Message(RecordDict(), dst_node_id=n, message_type="query")
                        for n in fresh]
                for reply in self.grid.send_and_receive(asks, timeout=self.wait):
                    if reply.has_error():
                        continue
                    index = int(str(reply.content.config_records["pod"]["index"]))
                    node = int(reply.metadata.src_node_id)
                    self.to_node[index], self.to_index[node] = node, index
            if len(self.to_node) < self.pods:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"only {len(self.to_node)} of {self.pods} simulated "
                                       f"pods answered within {self.wait:g} s")
                time.sleep(0.2)

    def node_ids(self) -> list[int]:
        self._discover()
        return sorted(self.to_node)

    def train(self, nodes: Sequence[int], payload: RoundMessage, timeout: float
              ) -> list[PodReply]:
        replies = self.inner.train([self.to_node[n] for n in nodes], payload, timeout)
        indexed = [PodReply(self.to_index[r.node_id], r.values, r.version, r.examples,
                            r.clipped, r.refusal, r.message) for r in replies]
        return sorted(indexed, key=lambda r: r.node_id)


def run_flower(cfg: Any, pods: int, workers: int,
               run: Callable[[IndexedTransport], dict[str, Any]]) -> dict[str, Any]:
    """Run ``run(transport)`` as the ServerApp of a Flower simulation of ``pods`` virtual
    SuperNodes, ``workers`` ClientApps at a time (one Ray actor per CPU); its result."""
    from flwr.simulation import run_simulation

    result: dict[str, Any] = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        result["record"] = run(IndexedTransport(grid, pods))

    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": workers, "num_gpus": 0, "include_dashboard": False,
                             "logging_level": "error", "log_to_driver": False}}
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # no GPUs to hide
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    # run_simulation is Flower's in-Python entry to the Simulation Runtime; 1.42 marks it
    # deprecated in favour of `flwr run`, which would package and install the app first.
    flwr_log.setLevel(logging.ERROR)
    try:
        run_simulation(server_app=server, client_app=client_app(cfg), num_supernodes=pods,
                       backend_config=backend)  # type: ignore[arg-type]
    finally:
        flwr_log.setLevel(level)
    if "record" not in result:
        raise RuntimeError("the Flower simulation ended without a run record")
    return result["record"]
