"""Real encrypted pods seeded with simulated users' messages (the demo's pods, and
``--encrypted-pods``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["seed_pods"]


def seed_pods(root: Path, users: Sequence[Any], passphrase: str, examples: int = 24,
              prefix: str = "pod", config: Any = None,
              budget: tuple[float, float] | None = None) -> list[Path]:
    """One encrypted pod per federated user under ``root``, with the user's consent to
    federated training and their first ``examples`` training examples; ``budget`` is
    the user's (maximum epsilon, delta), else the pod's default policy."""
    from covey.device import TRAINING_CONSENT, Pod, import_examples, set_budget_policy, set_consent

    homes = []
    for i, user in enumerate(users):
        home = root / f"{prefix}{i}"
        with Pod.create(home, passphrase, name=f"{prefix}{i}", config=config) as pod:
            set_consent(pod, TRAINING_CONSENT, True)
            import_examples(pod, user.train[:examples])
            if budget is not None:
                set_budget_policy(pod, *budget)
        homes.append(home)
    return homes
