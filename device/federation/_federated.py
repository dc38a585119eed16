"""The client side of a federated round, as one pure function shared by every backend.

``train_update`` takes the pod's consented examples and the current global adapter and
returns the update that may leave the device: the change of the adapter, clipped to L2
norm C and, in ``local`` mode, noised. It imports no Flower and touches no store, so the
pod's ClientApp, Flower's simulation runtime, the in-process simulation engine and the
tests all run the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from covey.privacy import DPConfig, NoiseSource, mechanism

if TYPE_CHECKING:
    from covey.models import Adapter, ChatTokenizer, Example, FinetuneConfig, TinyLM

__all__ = ["ClientUpdate", "noise_only_update", "release_update", "train_update",
           "train_updates"]


@dataclass(frozen=True)
class ClientUpdate:
    """What a pod sends (``delta``) and what it may report about it (no example text)."""

    delta: np.ndarray  # float32, flat, the order of Adapter.flat()
    norm: float  # L2 norm before clipping
    clipped: bool  # whether clipping scaled the update down
    examples: int
    tokens: int
    loss_before: float
    loss_after: float
    #: The same for every pod of one user in one round, different in every round, so the
    #: aggregator can refuse a second update of a user without linking rounds (set by
    #: the pod, outside this pure function; empty in simulations: one pod per user).
    user_token: str = ""

    @property
    def nbytes(self) -> int:
        """Bytes of the update's values as sent."""
        return int(self.delta.nbytes)

    def reported(self, dp: DPConfig) -> dict[str, int]:
        """What the pod tells the aggregator beside the update, and no more.

        Without DP: the number of examples (FedAvg's weight). In a private round the
        weights are uniform, so the count (raw, un-noised user data) stays on the pod; the
        losses and the user's epsilon never leave it. ``clipped``, one bit per pod, goes
        only to a central-mode aggregator, which sees the clipped update anyway and counts
        the bits under DP for adaptive clipping.
        """
        m = mechanism(dp)
        return {"examples": self.examples if m.reports_examples else 0,
                "clipped": int(self.clipped and m.reports_clipped)}


def train_update(model: TinyLM, tok: ChatTokenizer, examples: Sequence[Example],
                 global_adapter: Adapter, train: FinetuneConfig, dp: DPConfig,
                 noise: NoiseSource | None = None) -> ClientUpdate:
    """Train ``global_adapter`` on ``examples`` and return the clipped (and noised) delta.

    The clip norm is ``dp.clip_norm`` (``inf`` turns clipping off). In ``local`` mode
    Gaussian noise of standard deviation ``z * C`` is added here, on the device, from
    ``noise`` (default: the OS's CSPRNG); in ``central`` mode the aggregator adds it.

    Raises:
        ValueError: no examples, or training produced a non-finite update.
    """
    return train_updates(model, tok, [(examples, train, noise)], global_adapter, dp)[0]


def noise_only_update(global_adapter: Adapter, dp: DPConfig,
                      noise: NoiseSource | None = None) -> ClientUpdate:
    """What a pod with no examples sends when its mechanism answers for an empty pod
    (``local`` mode): the client step on a zero update, so the noise alone.

    A refusal would tell the aggregator that the user has no data; noise alone tells it
    nothing, and the release is charged like any other.
    """
    zero = np.zeros(global_adapter.num_parameters, np.float32)
    delta, _ = mechanism(dp).client_step(zero, dp, noise)
    return ClientUpdate(delta, 0.0, False, 0, 0, float("nan"), float("nan"))


def train_updates(model: TinyLM, tok: ChatTokenizer,
                  pods: Sequence[tuple[Sequence[Example], FinetuneConfig,
                                       NoiseSource | None]],
                  global_adapter: Adapter, dp: DPConfig) -> list[ClientUpdate]:
    """:func:`train_update` for several pods at once, each with its own examples,
    settings and noise source: the simulation's batched clients. Each update is the
    one the pod would compute alone (within float rounding).
    """
    from covey.models import FinetuneJob, finetune_adapters

    if any(not examples for examples, _, _ in pods):
        raise ValueError("no training examples")
    results = finetune_adapters(model, tok, [FinetuneJob(examples, global_adapter, train)
                                             for examples, train, _ in pods])
    start = global_adapter.flat()
    updates = []
    for result, (_, _, noise) in zip(results, pods, strict=True):
        released, norm = release_update(result.adapter.flat() - start, dp, noise)
        updates.append(ClientUpdate(released, norm, norm > dp.clip_norm, result.examples,
                                    result.tokens, result.loss_before, result.loss_after))
    return updates


def release_update(delta: np.ndarray, dp: DPConfig, noise: NoiseSource | None = None
                   ) -> tuple[np.ndarray, float]:
    """What leaves the pod for a trained ``delta``: the client step of the run's mechanism
    (clipped to ``dp.clip_norm`` and, in ``local`` mode, noised with N(0, (z C)^2) from
    ``noise``); and the norm before clipping. The privacy audit's canary clients send
    their crafted updates through it too."""
    return mechanism(dp).client_step(delta, dp, noise)
