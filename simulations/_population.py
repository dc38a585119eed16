"""The simulated population: the dataset's federated users who become pods, and the
messages every version is evaluated on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from covey.errors import InvalidInputError

if TYPE_CHECKING:
    from covey.simulations._config import SimulationConfig

__all__ = ["eval_sample", "population", "population_summary"]


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


def eval_sample(users: Sequence[Any], cfg: SimulationConfig, rng: np.random.Generator
                ) -> list[tuple[int, Any]]:
    """The federated test messages every round is evaluated on: (user index, example)."""
    tests = [(i, e) for i, u in enumerate(users) for e in u.test]
    picked = sorted(rng.choice(len(tests), min(cfg.eval_examples, len(tests)), replace=False))
    return [tests[i] for i in picked]
