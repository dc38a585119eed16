"""Simulated users: pods seeded from the federated share of the dataset."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["seed_pods"]


def seed_pods(root: Path, users: Sequence[Any], passphrase: str, examples: int = 24,
              prefix: str = "pod", config: Any = None) -> list[Path]:
    """One encrypted pod per federated user under ``root``, with the user's consent to
    federated training and their first ``examples`` training examples."""
    from covey.device import Pod
    from covey.device._feedback import TRAINING_CONSENT, set_consent
    from covey.device._participation import import_examples

    homes = []
    for i, user in enumerate(users):
        home = root / f"{prefix}{i}"
        with Pod.create(home, passphrase, name=f"{prefix}{i}", config=config) as pod:
            set_consent(pod, TRAINING_CONSENT, True)
            import_examples(pod, user.train[:examples])
        homes.append(home)
    return homes
