"""In-memory pods, trained in batches by the shared client training function, in this
process or spread over a pool of worker processes (each holding the model and the users)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from covey.aggregator import PodReply
from covey.privacy import NoiseSource, SecureNoise, SeededNoise
from covey.protocols import RoundMessage
from covey.simulations._population import population
from covey.simulations._sizing import preloaded, worker_malloc

if TYPE_CHECKING:
    from covey.device import ClientUpdate
    from covey.models import Tally
    from covey.simulations._config import SimulationConfig

__all__ = ["BATCHES_PER_WORKER", "POD_GROUP", "WORKER", "MemoryPods", "pod_noise", "train_pods"]


#: Pods trained together in one batched pass of the fast engine (memory grows with it):
#: 16 costs 6 % less per pod than 8 here (bf16; fp32 9 %), 32 no less than 16.
POD_GROUP = 16
#: Batches a round is cut into per worker, at least: fewer, bigger batches leave one
#: worker idle while another finishes (20 pods on 2 workers as 16 + 4: 0.8x the speed).
BATCHES_PER_WORKER = 3


def pod_noise(noise_seed: int | None, round: int, node: int,
              given: NoiseSource | None = None) -> NoiseSource:
    """A simulated pod's local-mode noise: the OS's CSPRNG, or, in a run with an explicit
    seed, a generator of (seed, round, pod) alone, so the result does not depend on which
    process or engine trains the pod; ``given``, when set, replaces both (see
    :func:`~covey.simulations._simulate.simulate`)."""
    if given is not None:
        return given
    return SecureNoise() if noise_seed is None else SeededNoise([noise_seed, round, node])


def _pod_job(users: Sequence[Any], node: int, request: RoundMessage,
             noise_seed: int | None, noise: NoiseSource | None = None
             ) -> tuple[Any, Any, NoiseSource]:
    """Pod ``node``'s examples, training settings and noise source for a round.

    The pod's training seed derives from the round's seed and the pod's index alone.
    """
    from covey.models import FinetuneConfig

    train = FinetuneConfig.for_round(request, pod=node, measure_loss=False)
    return users[node - 1].train, train, pod_noise(noise_seed, request.round, node, noise)


def train_pods(users: Sequence[Any], model: Any, tok: Any, nodes: Sequence[int],
               request: RoundMessage, noise_seed: int | None = None,
               noise: NoiseSource | None = None) -> list[ClientUpdate]:
    """Pods ``nodes`` (1-based into ``users``) run the client training function; the
    fast engine trains them ``POD_GROUP`` at a time, batched, with the same results.
    ``noise_seed``, ``noise``: see :func:`pod_noise`."""
    from covey.device import train_updates
    from covey.models import Adapter

    adapter = Adapter.from_bytes(request.adapter)
    # Pods of alike size train together: fewer padded rows and idle steps.
    order = sorted(range(len(nodes)), key=lambda i: (len(users[nodes[i] - 1].train), i))
    updates: list[ClientUpdate | None] = [None] * len(nodes)
    for at in range(0, len(order), POD_GROUP):
        group = order[at:at + POD_GROUP]
        trained = train_updates(model, tok, [_pod_job(users, nodes[i], request, noise_seed,
                                                      noise) for i in group],
                                adapter, request.dp)
        for i, update in zip(group, trained, strict=True):
            updates[i] = update
    return [u for u in updates if u is not None]


def _train_pods(users: Sequence[Any], model: Any, tok: Any, nodes: Sequence[int],
                payload: RoundMessage, noise_seed: int | None,
                noise: NoiseSource | None = None) -> list[PodReply]:
    updates = train_pods(users, model, tok, nodes, payload, noise_seed, noise)
    return [PodReply(node, values=update.delta, version=str(payload.version["id"]),
                     **update.reported(payload.dp))  # type: ignore[arg-type]
            for node, update in zip(nodes, updates, strict=True)]


#: The worker process's population, model and tokenizer, loaded once by its initializer.
WORKER: dict[str, Any] = {}


def _worker_init(cfg: SimulationConfig, users: Sequence[Any] | None) -> None:
    import torch

    from covey.models import load_model

    torch.set_num_threads(1)  # one process per core
    WORKER["users"] = population(cfg) if users is None else users
    WORKER["model"], WORKER["tok"], _ = load_model()


def _worker_allocator() -> str:
    maps = Path("/proc/self/maps")
    return "tcmalloc" if maps.exists() and "tcmalloc" in maps.read_text() else "glibc"


def _worker_train(nodes: Sequence[int], payload: RoundMessage, noise_seed: int | None,
                  noise: NoiseSource | None = None) -> list[PodReply]:
    return _train_pods(WORKER["users"], WORKER["model"], WORKER["tok"], nodes, payload,
                       noise_seed, noise)


def _worker_tally(adapter_bytes: bytes, batches: Any) -> Tally:
    from covey.aggregator import adapter_tally

    return adapter_tally(WORKER["model"], adapter_bytes, batches)


class MemoryPods:
    """In-memory pods: each answers with the shared client training function, in this
    process or spread over worker processes (each holding the model and the users)."""

    def __init__(self, users: Sequence[Any], model: Any, tok: Any, cfg: SimulationConfig,
                 workers: int, given: bool = False, noise: NoiseSource | None = None
                 ) -> None:
        self.users, self.model, self.tok = list(users), model, tok
        self.noise_seed, self.noise = cfg.seed, noise
        self.pool = None
        if workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            with preloaded(worker_malloc()):
                self.pool = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"),
                                                initializer=_worker_init,
                                                initargs=(cfg, self.users if given else None))
                # Start every worker now (each loads for seconds), under that allocator.
                self._started = [self.pool.submit(_worker_allocator) for _ in range(workers)]
        self.workers = workers

    def allocator(self) -> str | None:
        """The workers' memory allocator (None: no worker processes)."""
        if self.pool is None:
            return None
        return ", ".join(sorted({f.result() for f in self._started}))

    def node_ids(self) -> list[int]:
        return list(range(1, len(self.users) + 1))

    def train(self, nodes: Sequence[int], payload: RoundMessage, timeout: float
              ) -> list[PodReply]:
        if self.pool is None or len(nodes) < 2:
            return _train_pods(self.users, self.model, self.tok, nodes, payload,
                               self.noise_seed, self.noise)
        futures = [self.pool.submit(_worker_train, group, payload, self.noise_seed, self.noise)
                   for group in self._groups(nodes, payload.max_examples)]
        replies = [r for f in futures for r in f.result(timeout=timeout)]
        return sorted(replies, key=lambda r: r.node_id)

    def tally(self, adapter_bytes: bytes, parts: Sequence[Any]) -> list[Tally]:
        """Each part of the evaluation batches tallied by a worker, with the adapter."""
        if self.pool is None:
            raise RuntimeError("no worker processes to tally with (workers <= 1)")
        futures = [self.pool.submit(_worker_tally, adapter_bytes, part) for part in parts]
        return [f.result() for f in futures]

    def _groups(self, nodes: Sequence[int], max_examples: int) -> list[list[int]]:
        """Nodes in batches of up to ``POD_GROUP`` pods of alike size, the most work
        first (a pod's work grows with its examples, up to the round's cap), at least
        ``BATCHES_PER_WORKER`` per worker: each free worker takes the next batch, so the
        workers finish close together."""
        cost = {n: min(len(self.users[n - 1].train), max_examples) for n in nodes}
        ordered = sorted(nodes, key=lambda n: (-cost[n], n))
        size = max(1, min(POD_GROUP, -(-len(ordered) // (self.workers * BATCHES_PER_WORKER))))
        groups = [ordered[i:i + size] for i in range(0, len(ordered), size)]
        return sorted(groups, key=lambda g: -sum(cost[n] for n in g))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

