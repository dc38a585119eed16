"""Personal fine-tuning: how well each user does with an adapter of their own, trained
from the global adapter (or from scratch) on their own messages, never leaving the pod."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from covey.models import resolve_precision
from covey.simulations._pool import POD_GROUP, WORKER
from covey.simulations._population import eval_sample

if TYPE_CHECKING:
    from covey.models import Tally
    from covey.simulations._config import SimulationConfig

__all__ = ["personalized"]


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
    return _personal_scores(WORKER["users"], WORKER["model"], WORKER["tok"], group,
                            adapter_bytes, cfg)
