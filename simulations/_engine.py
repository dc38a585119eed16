"""The in-process engine: pods and aggregator in one Python process, no network.

It runs exactly the aggregator's ``run_federated`` and the pods' ``take_part`` that the
Flower deployment runs; only the transport differs. Each pod answers on its own thread,
and replies later than the round's timeout are dropped, as the SuperLink drops them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from covey.aggregator._rounds import PodReply, RoundPayload
from covey.device._participation import RoundRefused, RoundRequest, take_part
from covey.device._pod import Pod

__all__ = ["InProcessTransport", "PodClient", "request_for"]

PodHandler = Callable[[int, RoundPayload], PodReply]


def request_for(payload: RoundPayload, peer: str = "in-process") -> RoundRequest:
    """The request a pod sees for ``payload`` (what the Flower message carries)."""
    return RoundRequest(
        run_id=payload.run_id, round=payload.round, planned_rounds=payload.planned_rounds,
        dp=payload.dp, version=payload.version, signature=payload.signature,
        adapter=payload.adapter, local_epochs=payload.local_epochs, lr=payload.lr,
        max_examples=payload.max_examples, seed=payload.seed, peer=peer)


class PodClient:
    """One pod answering rounds in-process: opens its store, takes part, closes it."""

    def __init__(self, home: Path, passphrase: str, model: Any, tok: Any,
                 aggregator_key: bytes) -> None:
        self.home, self.passphrase = home, passphrase
        self.model = copy.deepcopy(model)  # training writes the LoRA weights: one per pod
        self.tok, self.aggregator_key = tok, aggregator_key

    def __call__(self, node_id: int, payload: RoundPayload) -> PodReply:
        try:
            with Pod.open(self.home, self.passphrase) as pod:
                update, _ = take_part(pod, request_for(payload), self.model, self.tok,
                                      self.aggregator_key)
        except RoundRefused as exc:
            return PodReply(node_id, refusal=exc.code, message=str(exc))
        return PodReply(node_id, values=update.delta, version=str(payload.version["id"]),
                        examples=update.examples, clipped=update.clipped)


class InProcessTransport:
    """Delivers rounds to in-process pods by node id."""

    def __init__(self, pods: Mapping[int, PodHandler]) -> None:
        self.pods = dict(pods)

    def node_ids(self) -> list[int]:
        return sorted(self.pods)

    def train(self, nodes: Sequence[int], payload: RoundPayload, timeout: float
              ) -> list[PodReply]:
        pool = ThreadPoolExecutor(max_workers=max(1, len(nodes)))
        futures = {pool.submit(self.pods[n], n, payload): n for n in nodes}
        done, _ = wait(futures, timeout=timeout)
        pool.shutdown(wait=False, cancel_futures=True)
        replies = []
        for future in done:
            error = future.exception()
            replies.append(PodReply(futures[future], refusal="error", message=type(
                error).__name__) if error else future.result())
        return sorted(replies, key=lambda r: r.node_id)
