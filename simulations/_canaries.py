"""Canary clients, for the privacy audit's replica of a run's mechanism.

Andrew et al. (ICLR 2024, "One-shot Empirical Privacy Estimation for Federated
Learning") estimate epsilon from one run by adding clients whose update is a fixed
random direction: they take part like any pod (sampled at the run's rate, their update
clipped and, in ``local`` mode, noised by the pod's own release function), and nothing
about them is trained. :class:`CanaryClients` wraps the simulation's transport and adds
them; the estimate itself is :func:`covey.privacy._canaries.canary_epsilon`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from covey.aggregator import PodReply, Transport
from covey.privacy import NoiseSource
from covey.protocols import RoundMessage

__all__ = ["CanaryClients"]


class CanaryClients:
    """Canary clients: canary i's update is ``directions[i] * norm`` in every round it is
    sampled. They record how often each was sampled and, in ``local`` mode, the sum of
    each one's releases (what the aggregator saw of it)."""

    def __init__(self, directions: np.ndarray, norm: float) -> None:
        if directions.ndim != 2 or not len(directions):
            raise ValueError("canary directions are a non-empty (count, size) array")
        if not (norm > 0 and math.isfinite(norm)):
            raise ValueError("a canary's norm must be positive and finite")
        self.directions, self.norm = directions, norm
        self.sampled = np.zeros(len(directions), np.int64)
        self.released: np.ndarray | None = None

    def around(self, inner: Transport, noise: Callable[[int, int], NoiseSource]
               ) -> Transport:
        """A transport with ``inner``'s pods and, after them, these canaries; ``noise``
        gives a pod's local-mode noise source for (round, node)."""
        return _WithCanaries(self, inner, noise)

    def send(self, index: int, payload: RoundMessage, noise: NoiseSource) -> np.ndarray:
        """Canary ``index``'s release in a round: its direction times the norm, through
        the pod's own release function (clipped; noised in ``local`` mode)."""
        from covey.device import release_update

        values, _ = release_update(self.directions[index] * np.float32(self.norm),
                                   payload.dp, noise)
        self.sampled[index] += 1
        if payload.dp.mode == "local":
            if self.released is None:
                self.released = np.zeros(self.directions.shape, np.float32)
            self.released[index] += values
        return values


class _WithCanaries:
    """The transport of :meth:`CanaryClients.around`."""

    def __init__(self, canaries: CanaryClients, inner: Transport,
                 noise: Callable[[int, int], NoiseSource]) -> None:
        self.canaries, self.inner, self.noise = canaries, inner, noise
        self.first = max(inner.node_ids(), default=0) + 1

    def node_ids(self) -> list[int]:
        return [*self.inner.node_ids(),
                *range(self.first, self.first + len(self.canaries.directions))]

    def train(self, nodes: Sequence[int], payload: RoundMessage, timeout: float
              ) -> list[PodReply]:
        from covey.device import ClientUpdate

        real = [n for n in nodes if n < self.first]
        replies = list(self.inner.train(real, payload, timeout)) if real else []
        for node in (n for n in nodes if n >= self.first):
            values = self.canaries.send(node - self.first, payload,
                                        self.noise(payload.round, node))
            # What a pod tells beside its update, exactly as a pod would: a canary's
            # norm is the run's initial C, so adaptive clipping counts it unclipped
            # while C is above it and clipped below, keeping C near where it started.
            norm = self.canaries.norm
            told = ClientUpdate(values, norm, norm > payload.dp.clip_norm, 1, 0, math.nan,
                                math.nan).reported(payload.dp)
            replies.append(PodReply(node, values=values, version=str(payload.version["id"]),
                                    examples=told["examples"], clipped=bool(told["clipped"])))
        return replies
