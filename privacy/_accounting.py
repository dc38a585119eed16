"""Privacy accounting for the subsampled Gaussian mechanism, composed over rounds.

What is accounted is exactly what the federated round does (see ``covey.privacy._dp``):
each round releases the sum of per-user updates clipped to L2 norm C plus Gaussian noise
of standard deviation z * C, where every user is included independently with
probability q (Poisson sampling). Adjacency is user-level add/remove: one user's whole
data present or absent. When inclusion is not Poisson-sampled by a party the user can
rely on, q is 1 and no amplification is claimed.

A privacy history is a sequence of :class:`GaussianRounds` segments (z, q, rounds).
Two accountants turn a history into epsilon at a given delta:

- ``rdp``: Renyi DP of the sampled Gaussian mechanism (Mironov, Talwar, Zhang 2019),
  computed here, composed additively over segments, converted to (epsilon, delta) with
  the conversion of Balle et al. 2020 (Proposition 12 of arXiv:2004.00010).
- ``prv``: privacy random variables composed numerically (Gopi, Lee, Wutschitz 2021),
  via Opacus; the tight one. It reports the upper end of its error interval.

Both are checked against Google's ``dp_accounting`` in the tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

__all__ = [
    "ACCOUNTANTS",
    "Accountant",
    "GaussianRounds",
    "PrvAccountant",
    "RdpAccountant",
    "epsilon_spent",
    "get_accountant",
    "noise_for_epsilon",
]

#: Renyi orders searched by the RDP accountant: fractional near 1 for small epsilon.
RDP_ORDERS: tuple[float, ...] = tuple(
    [1.0 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(11, 64)]
    + [128.0, 256.0, 512.0])

#: Beyond this noise multiplier an update is noise; the solver does not go further.
MAX_NOISE_MULTIPLIER = 1000.0


@dataclass(frozen=True)
class GaussianRounds:
    """``rounds`` releases of the Gaussian mechanism with noise multiplier ``z``.

    ``sample_rate`` is the probability that a user is included in a round (Poisson
    sampling); 1.0 means every round uses the user's data and claims no amplification.
    """

    noise_multiplier: float
    sample_rate: float
    rounds: int

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0 or not math.isfinite(self.noise_multiplier):
            raise ValueError(f"noise multiplier must be positive, got {self.noise_multiplier}")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"sample rate must be in (0, 1], got {self.sample_rate}")
        if self.rounds < 0:
            raise ValueError(f"rounds must be non-negative, got {self.rounds}")


class Accountant(Protocol):
    """Turns a privacy history into epsilon at a given delta."""

    name: str

    def epsilon(self, history: Sequence[GaussianRounds], delta: float) -> float:
        """The smallest epsilon this accountant certifies for ``history`` at ``delta``."""
        ...


def _log_add(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    hi, lo = max(a, b), min(a, b)
    return hi + math.log1p(math.exp(lo - hi))


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    """log A_alpha for integer alpha (Mironov et al. 2019, Section 3.3)."""
    from scipy import special

    log_a = -math.inf
    for i in range(alpha + 1):
        log_coef = (math.log(special.binom(alpha, i)) + i * math.log(q)
                    + (alpha - i) * math.log1p(-q))
        log_a = _log_add(log_a, log_coef + (i * i - i) / (2 * sigma**2))
    return log_a


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    """An upper bound on log A_alpha for fractional alpha (Section 3.3 of Mironov et al.).

    The two series over (-inf, z0] and [z0, inf) are summed with the absolute values of
    the generalised binomial coefficients, which can only overestimate A_alpha (as
    Google's dp_accounting does), up to the first term where both series decrease and
    are 30 nats below the running total. Returns inf when that does not happen within
    1000 terms: that order then certifies nothing.
    """
    from scipy import special

    i = np.arange(1000, dtype=np.float64)
    j = alpha - i
    log_coef = special.gammaln(alpha + 1) - special.gammaln(i + 1) - special.gammaln(j + 1)
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    log_erfc0 = math.log(2.0) + special.log_ndtr(-(i - z0) / sigma)
    log_erfc1 = math.log(2.0) + special.log_ndtr(-(z0 - j) / sigma)
    log_s0 = (log_coef + i * math.log(q) + j * math.log1p(-q) + (i * i - i) / (2 * sigma**2)
              + math.log(0.5) + log_erfc0)
    log_s1 = (log_coef + j * math.log(q) + i * math.log1p(-q) + (j * j - j) / (2 * sigma**2)
              + math.log(0.5) + log_erfc1)
    total = np.logaddexp.accumulate(np.logaddexp(log_s0, log_s1))
    done = ((log_s0[1:] < log_s0[:-1]) & (log_s1[1:] < log_s1[:-1])
            & (np.maximum(log_s0[1:], log_s1[1:]) < total[1:] - 30))
    if not done.any():
        return math.inf
    return float(total[1 + int(np.argmax(done))])


def sampled_gaussian_rdp(q: float, sigma: float, alpha: float) -> float:
    """RDP of one round of the Poisson-subsampled Gaussian mechanism at order ``alpha``."""
    if q == 1.0:
        return alpha / (2 * sigma**2)
    if math.isinf(alpha):
        return math.inf
    if float(alpha).is_integer():
        log_a = _log_a_int(q, sigma, int(alpha))
    else:
        log_a = _log_a_frac(q, sigma, alpha)
    return log_a / (alpha - 1)


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


class RdpAccountant:
    """Renyi-DP accountant; composes segments by adding their RDP curves."""

    name = "rdp"

    def __init__(self, orders: Sequence[float] = RDP_ORDERS) -> None:
        self.orders = np.asarray(orders, dtype=np.float64)

    def rdp(self, history: Sequence[GaussianRounds]) -> np.ndarray:
        """The composed RDP curve over ``self.orders``."""
        total = np.zeros_like(self.orders)
        for seg in history:
            if seg.rounds:
                total += seg.rounds * np.array(
                    [sampled_gaussian_rdp(seg.sample_rate, seg.noise_multiplier, a)
                     for a in self.orders])
        return total

    def epsilon(self, history: Sequence[GaussianRounds], delta: float) -> float:
        _check_delta(delta)
        if not any(seg.rounds for seg in history):
            return 0.0
        rdp, a = self.rdp(history), self.orders
        eps = rdp - (math.log(delta) + np.log(a)) / (a - 1) + np.log((a - 1) / a)
        return float(max(0.0, np.nanmin(eps)))


class PrvAccountant:
    """Privacy-random-variable accountant (Opacus); numerically tight, reports its upper bound."""

    name = "prv"

    def __init__(self, eps_error: float = 0.01) -> None:
        self.eps_error = eps_error

    def epsilon(self, history: Sequence[GaussianRounds], delta: float) -> float:
        _check_delta(delta)
        segments = [s for s in history if s.rounds]
        if not segments:
            return 0.0
        from opacus.accountants import PRVAccountant

        prv = PRVAccountant()
        prv.history = [(s.noise_multiplier, s.sample_rate, s.rounds) for s in segments]
        with np.errstate(divide="ignore", invalid="ignore"):
            upper = prv.get_epsilon(delta, eps_error=self.eps_error)
        return float(max(0.0, upper))


ACCOUNTANTS: dict[str, Callable[[], Accountant]] = {"rdp": RdpAccountant, "prv": PrvAccountant}


def get_accountant(name: str) -> Accountant:
    """The accountant called ``name`` (``rdp`` or ``prv``)."""
    try:
        return ACCOUNTANTS[name]()
    except KeyError:
        raise ValueError(f"unknown accountant {name!r}; known: {sorted(ACCOUNTANTS)}") from None


def epsilon_spent(history: Sequence[GaussianRounds], delta: float, accountant: str = "rdp"
                  ) -> float:
    """Epsilon of ``history`` at ``delta`` by the named accountant."""
    return get_accountant(accountant).epsilon(history, delta)


def noise_for_epsilon(target_epsilon: float, delta: float, sample_rate: float, rounds: int,
                      accountant: str = "rdp", tolerance: float = 1e-3) -> float:
    """The smallest noise multiplier (within ``tolerance``) whose epsilon is <= the target.

    Never overshoots: the returned multiplier is one the accountant certifies at or
    below ``target_epsilon``. Raises ValueError when even ``MAX_NOISE_MULTIPLIER`` does not.
    """
    if not target_epsilon > 0 or not math.isfinite(target_epsilon):
        raise ValueError(f"target epsilon must be positive, got {target_epsilon}")
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    acc = get_accountant(accountant)

    def eps(z: float) -> float:
        return acc.epsilon([GaussianRounds(z, sample_rate, rounds)], delta)

    high = 1.0
    while eps(high) > target_epsilon:
        if high >= MAX_NOISE_MULTIPLIER:
            raise ValueError(
                f"no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} meets epsilon "
                f"{target_epsilon:g} at delta {delta:g} over {rounds} rounds with sample "
                f"rate {sample_rate:g}; allow a larger epsilon or fewer rounds")
        high = min(2 * high, MAX_NOISE_MULTIPLIER)
    low = high / 2 if high > 1.0 else 0.0
    while high - low > tolerance * max(high, 1.0):
        mid = (low + high) / 2
        if mid > 0 and eps(mid) <= target_epsilon:
            high = mid
        else:
            low = mid
    return high
