"""In-process transports: real pods and the aggregator in one Python process, no network.

It runs exactly the aggregator's ``run_federated`` and the pods' ``take_part`` that the
Flower deployment runs; only the transport differs. Each pod answers on its own thread,
and replies later than the round's timeout are dropped, as the SuperLink drops them.
"""

from __future__ import annotations

import copy
import queue
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from covey.aggregator import PodReply
from covey.device import Pod, RoundRefused, RoundRequest, take_part
from covey.protocols import RoundMessage

__all__ = ["InProcessTransport", "PodClient", "StorePods", "answer"]

PodHandler = Callable[[int, RoundMessage], PodReply]

#: Who sent a round, as in-process pods record it in their audit logs.
PEER = "in-process"


def answer(home: Path, passphrase: str, model: Any, tok: Any, aggregator_key: bytes,
           node_id: int, payload: RoundMessage) -> PodReply:
    """Pod ``home`` answers a round: opens its store, takes part (or refuses), closes it."""
    try:
        with Pod.open(home, passphrase) as pod:
            request = RoundRequest.received(payload, PEER)
            update, _ = take_part(pod, request, model, tok, aggregator_key)
    except RoundRefused as exc:
        return PodReply(node_id, refusal=exc.code, message=str(exc))
    return PodReply(node_id, values=update.delta, version=str(payload.version["id"]),
                    user_token=update.user_token,
                    **update.reported(payload.dp))  # type: ignore[arg-type]


def charge(home: Path, passphrase: str, aggregator_key: bytes, node_id: int,
           payload: RoundMessage) -> PodReply:
    """Pod ``home`` charges a run announced to it (see :func:`join_run`), or refuses."""
    from covey.device import join_run

    try:
        with Pod.open(home, passphrase) as pod:
            join_run(pod, RoundRequest.received(payload, PEER), aggregator_key)
    except RoundRefused as exc:
        return PodReply(node_id, refusal=exc.code, message=str(exc))
    return PodReply(node_id)


class PodClient:
    """One pod answering rounds in-process with a model of its own."""

    def __init__(self, home: Path, passphrase: str, model: Any, tok: Any,
                 aggregator_key: bytes) -> None:
        self.home, self.passphrase = home, passphrase
        self.model = copy.deepcopy(model)  # training writes the LoRA weights: one per pod
        self.tok, self.aggregator_key = tok, aggregator_key

    def __call__(self, node_id: int, payload: RoundMessage) -> PodReply:
        return answer(self.home, self.passphrase, self.model, self.tok, self.aggregator_key,
                      node_id, payload)

    def announce(self, node_id: int, payload: RoundMessage) -> PodReply:
        return charge(self.home, self.passphrase, self.aggregator_key, node_id, payload)


class StorePods:
    """Pods that keep their data in real encrypted stores (``--encrypted-pods``).

    Every round, each sampled pod unlocks its store (Argon2id, SQLCipher), takes part as
    a real pod does (consent, signature, budget ledger, audit entry) and closes it;
    ``workers`` pods answer at a time, each borrowing one of ``workers`` model copies.
    """

    def __init__(self, homes: Sequence[Path], passphrase: str, model: Any, tok: Any,
                 aggregator_key: bytes, workers: int) -> None:
        self.homes, self.passphrase, self.tok = list(homes), passphrase, tok
        self.aggregator_key, self.workers = aggregator_key, max(1, workers)
        self.models: queue.Queue[Any] = queue.Queue()
        for _ in range(self.workers):
            self.models.put(copy.deepcopy(model))

    def node_ids(self) -> list[int]:
        return list(range(1, len(self.homes) + 1))

    def _one(self, node: int, payload: RoundMessage) -> PodReply:
        model = self.models.get()
        try:
            return answer(self.homes[node - 1], self.passphrase, model, self.tok,
                          self.aggregator_key, node, payload)
        finally:
            self.models.put(model)

    def train(self, nodes: Sequence[int], payload: RoundMessage, timeout: float
              ) -> list[PodReply]:
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(lambda n: self._one(n, payload), nodes, timeout=timeout))

    def announce(self, nodes: Sequence[int], payload: RoundMessage, timeout: float
                 ) -> list[PodReply]:
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(lambda n: charge(self.homes[n - 1], self.passphrase,
                                                  self.aggregator_key, n, payload),
                                 nodes, timeout=timeout))


class InProcessTransport:
    """Delivers rounds to in-process pods by node id."""

    def __init__(self, pods: Mapping[int, PodHandler]) -> None:
        self.pods = dict(pods)

    def node_ids(self) -> list[int]:
        return sorted(self.pods)

    def announce(self, nodes: Sequence[int], payload: RoundMessage, timeout: float
                 ) -> list[PodReply]:
        """Pods that keep a ledger (``PodClient``) charge the run; others need nothing."""
        return [self.pods[n].announce(n, payload) for n in nodes  # type: ignore[attr-defined]
                if hasattr(self.pods[n], "announce")]

    def train(self, nodes: Sequence[int], payload: RoundMessage, timeout: float
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
