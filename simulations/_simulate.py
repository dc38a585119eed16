"""Federated simulations on one machine: every federated user of the dataset is a pod.

The ``fast`` engine runs the aggregator's own ``run_federated`` (sampling, checks,
DP-FedAvg, evaluation, signed versions, rollback, accounting, the run record) over
in-memory pods that call the same client training function as a real pod
(:func:`covey.device.federation._federated.train_update`). Pods hold their user's examples in
memory; there is no store, network or Flower process, so the figures measure learning
and privacy, not transport.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from covey._files import write_atomic
from covey.aggregator import PodReply, RunConfig, run_federated
from covey.errors import InvalidInputError
from covey.models import resolve_precision
from covey.privacy import AdaptiveClipping, DPConfig, NoiseSource, SecureNoise, SeededNoise
from covey.protocols import RoundMessage

if TYPE_CHECKING:
    from covey.device import ClientUpdate
    from covey.models import Tally
    from covey.simulations._canaries import CanaryClients

__all__ = ["SimulationConfig", "eval_sample", "personalized", "population",
           "population_summary", "simulate", "train_pods"]

ENGINES = ("fast", "flower")


@dataclass(frozen=True)
class SimulationConfig:
    """What ``covey simulate`` runs."""

    pods: int = 0  # 0: every federated user with at least min_messages training messages
    min_messages: int = 2
    rounds: int = 10
    clients_per_round: int = 10
    target_epsilon: float = 8.0  # inf: no DP (plain FedAvg)
    mode: str = "central"
    clip_norm: float = 1.0
    delta: float = 0.0  # 0: a tenth of 1 / population
    accountant: str = "rdp"
    local_epochs: int = 1
    lr: float = 5e-3
    max_examples: int = 64
    eval_examples: int = 300
    #: None: the DP noise comes from the OS's CSPRNG and the run is private (the pods and
    #: evaluation messages are still chosen with seed 0). A number: everything derives
    #: from it, noise included, so the run is reproducible and reported as not private.
    seed: int | None = None
    engine: str = "fast"
    workers: int = 0  # processes training pods (0: one per CPU core)
    encrypted_pods: bool = False  # each pod keeps its data in a real encrypted store
    noise_multiplier: float | None = None  # set: this z (0: no DP) instead of the target's
    precision: str = "auto"  # of the pods' training; auto: bf16 where the CPU has it natively
    #: The Poisson sampling rate q of pods (0: clients_per_round / pods): the privacy
    #: audit's replica runs at the audited run's own q.
    sample_rate: float = 0.0
    adaptive: AdaptiveClipping | None = None  # quantile-based adaptive clipping (central)
    personalize: bool = True  # measure personal fine-tuning at the end (the audit skips it)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise InvalidInputError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.rounds < 1 or self.clients_per_round < 1 or self.min_messages < 1:
            raise InvalidInputError("rounds, clients per round and min messages must be >= 1")
        if self.workers < 0:
            raise InvalidInputError("workers must be >= 0 (0: one per CPU core)")
        if self.pods < 0:
            raise InvalidInputError("pods must be >= 0 (0: every eligible user)")
        if not self.target_epsilon > 0:
            raise InvalidInputError("target epsilon must be positive (inf: no DP)")
        if self.mode not in ("central", "local"):
            raise InvalidInputError("mode must be central or local")
        if self.encrypted_pods and self.engine != "fast":
            raise InvalidInputError("--encrypted-pods runs on the fast engine")
        try:
            resolve_precision(self.precision)
        except ValueError as exc:
            raise InvalidInputError(str(exc)) from None
        if self.seed is not None and self.seed < 0:
            raise InvalidInputError("seed must be >= 0")
        if not 0.0 <= self.sample_rate <= 1.0:
            raise InvalidInputError("sample rate must be in (0, 1] (0: clients per round / "
                                    "pods)")
        if self.adaptive is not None and self.mode != "central":
            raise InvalidInputError("adaptive clipping needs central mode")
        if self.encrypted_pods and math.isinf(self.target_epsilon):
            raise InvalidInputError("--encrypted-pods needs a private run: real pods refuse "
                                    "rounds without DP")

    @property
    def choice_seed(self) -> int:
        """What picks the pods, the evaluation messages and the training order."""
        return 0 if self.seed is None else self.seed


#: Peak resident memory measured here: the main process (model, population, evaluator)
#: 956 MiB; a ``fast`` worker process on the whole population over 100 rounds 1.46 GB
#: on tcmalloc, 3.9 GB on glibc's malloc (which keeps the freed memory of batches of
#: many sizes; trimming it after every batch held a worker near 1 GB but made rounds
#: 5-20 % slower); a Ray actor running the ClientApp about 890 MiB (30 pods), plus Ray's
#: daemons and driver about 1 GiB. An ``--encrypted-pods`` worker is a thread with one
#: model copy (an estimate).
MAIN_BYTES = 1000 * 2**20
WORKER_BYTES = {"fast": 4096 * 2**20, "fast-tcmalloc": 1536 * 2**20, "flower": 900 * 2**20,
                "encrypted": 40 * 2**20}
RAY_BYTES = 1024 * 2**20


def available_memory() -> int | None:
    """Bytes of memory available to new processes (Linux ``MemAvailable``), if known."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(cfg: SimulationConfig, workers: int, available: int | None = None) -> None:
    """Fail before any work when the engine would not fit in memory."""
    kind = "encrypted" if cfg.encrypted_pods else cfg.engine
    per = WORKER_BYTES["fast-tcmalloc" if kind == "fast" and worker_malloc() else kind]
    need = MAIN_BYTES + workers * per + (RAY_BYTES if kind == "flower" else 0)
    available = available_memory() if available is None else available
    if available is not None and need > available:
        raise InvalidInputError(
            f"the {kind} engine with {workers} workers needs about {need / 2**30:.1f} GiB of "
            f"memory but {available / 2**30:.1f} GiB is available; use fewer --workers")


def population(cfg: SimulationConfig) -> list[Any]:
    """The federated users who become pods (a deterministic choice for the seed)."""
    from covey.models import load_corpus

    users = [u for u in load_corpus().federated if len(u.train) >= cfg.min_messages]
    if cfg.pods:
        if cfg.pods > len(users):
            raise InvalidInputError(f"only {len(users)} federated users have at least "
                                    f"{cfg.min_messages} messages; asked for {cfg.pods} pods")
        rng = np.random.default_rng(cfg.choice_seed)
        users = [users[i] for i in sorted(rng.choice(len(users), cfg.pods, replace=False))]
    return users


def population_summary(users: Sequence[Any], tok: Any) -> dict[str, Any]:
    """Users, messages per user and tokens of a population."""
    train = [len(u.train) for u in users]
    test = [len(u.test) for u in users]
    tokens = sum(len(ids) for u in users for ids in tok.encode_batch([e.reply for e in u.train]))
    return {"users": len(users), "train_messages": int(sum(train)),
            "test_messages": int(sum(test)),
            "messages_per_user": {"min": int(min(train)), "median": float(np.median(train)),
                                  "max": int(max(train))},
            "train_reply_tokens": int(tokens)}


_WORKER: dict[str, Any] = {}


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
    :func:`simulate`)."""
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


def _worker_init(cfg: SimulationConfig, users: Sequence[Any] | None) -> None:
    import torch

    from covey.models import load_model

    torch.set_num_threads(1)  # one process per core
    _WORKER["users"] = population(cfg) if users is None else users
    _WORKER["model"], _WORKER["tok"], _ = load_model()


def _worker_tally(adapter_bytes: bytes, batches: Any) -> Tally:
    from covey.aggregator import adapter_tally

    return adapter_tally(_WORKER["model"], adapter_bytes, batches)


@functools.cache
def worker_malloc() -> str | None:
    """The allocator the fast engine's workers preload, if installed: tcmalloc.

    PyTorch on CPU allocates and frees tensors of many sizes at every step; glibc's
    malloc returns memory to the system and faults it back in, and keeps growing over a
    long run. With tcmalloc a worker trained 16-pod batches 18 % faster here, at 1.3 GB
    peak memory instead of 2.2 GB. It changes no result: only where memory comes from.
    """
    from ctypes.util import find_library

    return find_library("tcmalloc_minimal")


@contextlib.contextmanager
def _preloaded(library: str | None) -> Iterator[None]:
    """Processes started inside preload ``library`` (``LD_PRELOAD``), if given."""
    before = os.environ.get("LD_PRELOAD")
    if library:
        os.environ["LD_PRELOAD"] = f"{library} {before}" if before else library
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("LD_PRELOAD", None)
        else:
            os.environ["LD_PRELOAD"] = before


def _worker_allocator() -> str:
    maps = Path("/proc/self/maps")
    return "tcmalloc" if maps.exists() and "tcmalloc" in maps.read_text() else "glibc"


def _worker_train(nodes: Sequence[int], payload: RoundMessage, noise_seed: int | None,
                  noise: NoiseSource | None = None) -> list[PodReply]:
    return _train_pods(_WORKER["users"], _WORKER["model"], _WORKER["tok"], nodes, payload,
                       noise_seed, noise)


class _MemoryPods:
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

            with _preloaded(worker_malloc()):
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
        assert self.pool is not None
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


def _store_pods(users: Sequence[Any], model: Any, tok: Any, out: Path, key: bytes,
                workers: int, budget: tuple[float, float]) -> Any:
    """One real encrypted pod per user under ``out/pods`` (kept for a resumed run), each
    holding all of its user's training messages, their consent to federated training and
    a budget policy of the run's target (epsilon, delta); the passphrase is random, in
    ``out/pods/passphrase`` (mode 0600)."""
    import secrets

    from covey.simulations._engine import StorePods
    from covey.simulations._population import seed_pods

    root, secret = out / "pods", out / "pods" / "passphrase"
    if secret.exists():
        passphrase = secret.read_text().strip()
        homes = [root / f"pod{i}" for i in range(len(users))]
    else:
        root.mkdir(parents=True, exist_ok=True)
        passphrase = secrets.token_urlsafe(16)
        write_atomic(secret, passphrase.encode(), mode=0o600)
        homes = seed_pods(root, users, passphrase, examples=max(len(u.train) for u in users),
                          budget=budget)
    return StorePods(homes, passphrase, model, tok, key, workers)


def _dp(cfg: SimulationConfig, pods: int) -> DPConfig:
    q = cfg.sample_rate or min(1.0, cfg.clients_per_round / pods)
    delta = cfg.delta or 0.1 / pods
    if cfg.noise_multiplier:
        return DPConfig(mode=cfg.mode, noise_multiplier=cfg.noise_multiplier,  # type: ignore[arg-type]
                        clip_norm=cfg.clip_norm, sample_rate=q, delta=delta,
                        accountant=cfg.accountant, adaptive=cfg.adaptive)
    if math.isinf(cfg.target_epsilon) or cfg.noise_multiplier == 0:
        return DPConfig(mode="central", noise_multiplier=0.0, clip_norm=math.inf,
                        sample_rate=q, delta=delta, accountant=cfg.accountant)
    dp = DPConfig(mode=cfg.mode, clip_norm=cfg.clip_norm, sample_rate=q,  # type: ignore[arg-type]
                  delta=delta, accountant=cfg.accountant, adaptive=cfg.adaptive)
    try:
        return dp.solved(cfg.target_epsilon, cfg.rounds)
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from None


def eval_sample(users: Sequence[Any], cfg: SimulationConfig, rng: np.random.Generator
                ) -> list[tuple[int, Any]]:
    """The federated test messages every round is evaluated on: (user index, example)."""
    tests = [(i, e) for i, u in enumerate(users) for e in u.test]
    picked = sorted(rng.choice(len(tests), min(cfg.eval_examples, len(tests)), replace=False))
    return [tests[i] for i in picked]


def personalized(cfg: SimulationConfig, users: Sequence[Any], adapter_bytes: bytes | None,
                 pool: Any = None) -> dict[str, float]:
    """Each user in the evaluation sample fine-tunes a personal adapter on their own
    training messages, starting from ``adapter_bytes`` (the global adapter; None: from
    scratch, which is local-only training), and is evaluated on their own messages of
    the sample. The personal adapter never leaves the pod. ``pool``: the fast engine's
    worker processes (holding ``users``), which then share the work."""
    import torch

    from covey.models import Adapter, Tally, TinyLM, load_model

    by_user: dict[int, list[Any]] = {}
    for index, example in eval_sample(users, cfg, np.random.default_rng(cfg.choice_seed)):
        by_user.setdefault(index, []).append(example)
    model: Any = None
    tok: Any = None
    if adapter_bytes is None or pool is None:  # the model is needed here, not only in workers
        model, tok, _ = load_model()
    if adapter_bytes is None:
        torch.manual_seed(cfg.choice_seed)
        adapter_bytes = Adapter.zeros_like(TinyLM(model.cfg)).to_bytes()
    # Users of alike size train together, the most work first (as pods do in rounds).
    ordered = sorted(by_user.items(), key=lambda item: (-len(users[item[0]].train), item[0]))
    groups = [ordered[i:i + POD_GROUP] for i in range(0, len(ordered), POD_GROUP)]
    if pool is not None:
        futures = [pool.submit(_worker_personal, group, adapter_bytes, cfg) for group in groups]
        scores = [f.result() for f in futures]
    else:
        scores = [_personal_scores(users, model, tok, group, adapter_bytes, cfg,
                                   os.cpu_count() or 1) for group in groups]
    q = sum(scores, Tally()).quality(sum(len(examples) for examples in by_user.values()))
    return {"perplexity": round(q.perplexity, 4), "top1": round(q.top1, 4),
            "top3": round(q.top3, 4), "users": len(by_user)}


def _personal_scores(users: Sequence[Any], model: Any, tok: Any,
                     group: Sequence[tuple[int, list[Any]]], adapter_bytes: bytes,
                     cfg: SimulationConfig, threads: int = 1) -> Tally:
    """Personal adapters of ``group`` (user index, their evaluation examples), trained
    together, each tallied on its own user's examples."""
    from covey.models import (
        Adapter,
        FinetuneConfig,
        FinetuneJob,
        Tally,
        examples_to_batches,
        finetune_adapters,
        tally,
        torch_scored,
    )

    start = Adapter.from_bytes(adapter_bytes)
    trained = finetune_adapters(model, tok, [FinetuneJob(users[index].train, start, FinetuneConfig(
        epochs=max(cfg.local_epochs, 1), lr=cfg.lr, max_examples=cfg.max_examples,
        seed=cfg.choice_seed, measure_loss=False, precision=resolve_precision(cfg.precision),
        threads=threads)) for index, _ in group])
    total = Tally()
    for (_, examples), result in zip(group, trained, strict=True):
        result.adapter.load_into(model)
        total += tally(torch_scored(model), examples_to_batches(tok, examples, model.cfg.context))
    return total


def _worker_personal(group: Sequence[tuple[int, list[Any]]], adapter_bytes: bytes,
                     cfg: SimulationConfig) -> Tally:
    return _personal_scores(_WORKER["users"], _WORKER["model"], _WORKER["tok"], group,
                            adapter_bytes, cfg)


def _unfinished(out: Path) -> str | None:
    """The run id of an interrupted simulation in ``out``, if any."""
    for path in sorted((out / "runs").glob("*.json")) if (out / "runs").exists() else []:
        try:
            if json.loads(path.read_text()).get("status") == "running":
                return path.stem
        except ValueError:
            continue
    return None


def simulate(cfg: SimulationConfig, out: Path,
             on_round: Callable[[dict[str, Any]], None] | None = None,
             resume: bool = False, users: Sequence[Any] | None = None,
             noise: NoiseSource | None = None, canaries: CanaryClients | None = None
             ) -> dict[str, Any]:
    """Run a simulation; writes population.json, the registry and the run record to ``out``.

    Every round is checkpointed beside the run record, never in it (the sampling
    ratchet's state, never the noise's; owner-only, removed when the run completes);
    ``resume`` continues an interrupted run in ``out`` (same configuration): with
    ``--seed`` it gives the same result as an uninterrupted run, else fresh noise.
    ``users`` replaces the dataset's population (the privacy audit plants secrets in
    some users' data this way); ``noise`` replaces every noise source of the run, the
    aggregator's and the pods' (it must hold no state a copy would repeat: worker
    processes get copies); ``canaries`` adds canary clients to the pods (see
    :mod:`covey.simulations._canaries`). The three run on the fast engine, for the
    privacy audit's replica of a run's mechanism.

    Raises:
        InvalidInputError: an impossible configuration (before any work), or nothing to
            resume.
    """
    from covey.models import load_model

    if resume and _unfinished(out) is None:
        raise InvalidInputError(f"no interrupted simulation to resume in {out}")
    given = users is not None
    users = list(users) if users is not None else population(cfg)
    if cfg.clients_per_round > len(users):
        raise InvalidInputError(f"{cfg.clients_per_round} clients per round but only "
                                f"{len(users)} pods")
    if (given or noise is not None or canaries is not None) and \
            (cfg.engine != "fast" or cfg.encrypted_pods):
        raise InvalidInputError("a given population, noise or canaries run on the fast "
                                "engine's in-memory pods")
    dp = _dp(cfg, len(users))
    workers = cfg.workers or (os.cpu_count() or 1)
    check_memory(cfg, workers)
    model, tok, _ = load_model()
    # The fast engine's workers start now: they load while this process sets up, and
    # evaluate every version as well as train the pods.
    pods = (_MemoryPods(users, model, tok, cfg, workers, given, noise)
            if cfg.engine == "fast" and not cfg.encrypted_pods else None)
    try:
        return _simulate(cfg, out, users, dp, workers, model, tok, pods, on_round, resume,
                         noise, canaries)
    finally:
        if pods is not None:
            pods.close()


def _simulate(cfg: SimulationConfig, out: Path, users: Sequence[Any], dp: DPConfig,
              workers: int, model: Any, tok: Any, pods: _MemoryPods | None,
              on_round: Callable[[dict[str, Any]], None] | None, resume: bool,
              noise: NoiseSource | None = None, canaries: CanaryClients | None = None
              ) -> dict[str, Any]:
    from covey.aggregator import AdapterEvaluator, Registry

    out.mkdir(parents=True, exist_ok=True)
    summary = population_summary(users, tok)
    (out / "population.json").write_text(json.dumps(summary, indent=2) + "\n")
    chosen = [example for _, example in
              eval_sample(users, cfg, np.random.default_rng(cfg.choice_seed))]
    pool = pods.pool if pods is not None else None
    evaluator = AdapterEvaluator(chosen, threads=os.cpu_count() or 1, model=model, tok=tok,
                                 spread=pods.tally if pods is not None and pool is not None
                                 else None, parts=workers)
    registry = Registry(out / "registry")
    unfinished = _unfinished(out) if resume else None
    if unfinished is not None:
        run_id = unfinished
        first = next(v for v in registry.versions() if v.round == 0 and v.run_id == run_id)
    else:
        run_id = f"sim-{time.strftime('%Y%m%d-%H%M%S')}-{cfg.choice_seed}"
        initial = evaluator.initial_adapter(cfg.choice_seed)
        first, _ = registry.add(initial, parent=None, round=0, run_id=run_id,
                                metrics=evaluator(initial), epsilon=0.0)
        registry.activate(first.id)
    run = RunConfig(rounds=cfg.rounds, dp=dp, target_epsilon=cfg.target_epsilon
                    if math.isfinite(cfg.target_epsilon) else None, min_pods=1,
                    round_timeout=3600.0, wait_timeout=1.0, local_epochs=cfg.local_epochs,
                    lr=cfg.lr, max_examples=cfg.max_examples, eval_examples=len(chosen),
                    seed=cfg.choice_seed, precision=resolve_precision(cfg.precision),
                    reproducible_seed=cfg.seed)
    (out / "runs").mkdir(exist_ok=True)
    started = time.perf_counter()

    def rounds(transport: Any) -> dict[str, Any]:
        return run_federated(transport, registry, run, run_id, evaluator,
                             out / "runs" / f"{run_id}.json", on_round=on_round,
                             resume=resume, noise=noise)

    if cfg.engine == "flower":
        from covey.simulations._flower import run_flower

        record = run_flower(cfg, len(users), workers, rounds)
    elif cfg.encrypted_pods:
        record = rounds(_store_pods(users, model, tok, out, registry.public_key, workers,
                                    (cfg.target_epsilon, dp.delta)))
    elif canaries is not None and pods is not None:
        record = rounds(canaries.around(pods, lambda rnd, node: pod_noise(cfg.seed, rnd, node,
                                                                          noise)))
    else:
        record = rounds(pods)
    seconds = time.perf_counter() - started
    # The fast engine's workers, still up, share the personal fine-tuning.
    personal = (personalized(cfg, users, registry.get(record["final_version"])[1], pool)
                if cfg.personalize else None)
    updates = sum(r["accepted"] for r in record["rounds"])
    final = registry.get(record["final_version"])[0]
    record.update(simulation={**asdict(cfg), "precision": run.precision,
                              "population": summary, "engine": cfg.engine,
                              "base_metrics": first.metrics,
                              "global_metrics": final.metrics,
                              "personalized_metrics": personal,
                              "seconds": round(seconds, 2),
                              "client_updates": updates,
                              "updates_per_second": round(updates / seconds, 3),
                              "workers": workers,
                              "worker_allocator": pods.allocator() if pods else None})
    write_atomic(out / "runs" / f"{run_id}.json", (json.dumps(record, indent=2) + "\n").encode())
    record["record_path"] = str(out / "runs" / f"{run_id}.json")
    return record
