"""A pod taking part in a federated round: consent, signature, budget, training, ledger.

The Flower ClientApp (``covey.device.clientapp``) is a thin adapter around
:func:`take_part`, which owns every decision a pod makes about a round:

1. the user has granted the ``federated_training`` consent and has consented examples;
2. the model version the aggregator sent is signed by the pinned aggregator key and its
   bytes match the signed hash;
3. the round fits the user's budget: the pod composes its ledger with what this round
   charges, using its own accountant at the user's delta, and refuses past the maximum;
4. it trains (the pure :func:`covey.device._federated.train_update`), and records the
   ledger row and the audit entry (what, to whom, bytes, epsilon) in one transaction
   *before* the update is handed over for sending.

What a round charges. In ``central`` mode the aggregator Poisson-samples pods at rate q
for a run of T planned rounds; a user's privacy loss is that of all T rounds whether or
not the pod is sampled in each, so the first participation in a run charges the whole
(z, q, T) and later ones charge nothing more (a round past T is refused). In ``local``
mode the pod cannot verify any sampling: each participation charges one unamplified
Gaussian release with the pod's own noise.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from covey.device._feedback import TRAINING_CONSENT, consented
from covey.device._pod import Pod
from covey.device._stop import is_stopped
from covey.device._store import set_meta
from covey.errors import CoveyError
from covey.models import check_precision
from covey.privacy import DPConfig, GaussianRounds, get_accountant
from covey.protocols import ModelVersion, SignatureError, verify_version

if TYPE_CHECKING:
    from covey.device._federated import ClientUpdate
    from covey.models import ChatTokenizer, Example, TinyLM

__all__ = [
    "BudgetPolicy",
    "RoundRefused",
    "RoundRequest",
    "budget_policy",
    "import_examples",
    "ledger_history",
    "set_budget_policy",
    "spent",
    "take_part",
]

DEFAULT_MAX_EPSILON = 10.0
DEFAULT_DELTA = 1e-5
_MAX_EPS_KEY = "privacy.max_epsilon"
_DELTA_KEY = "privacy.delta"


class RoundRefused(CoveyError):
    """The pod declines a round; ``code`` says why, the message says it to a person."""

    exit_code = 2

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class BudgetPolicy:
    """The user's privacy budget: the most epsilon (at ``delta``) any rounds may take."""

    max_epsilon: float = DEFAULT_MAX_EPSILON
    delta: float = DEFAULT_DELTA
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        if any(isinstance(v, bool) or not isinstance(v, numbers.Real)
               for v in (self.max_epsilon, self.delta)):
            raise ValueError("the maximum epsilon and delta are numbers")
        if not self.max_epsilon >= 0 or not math.isfinite(self.max_epsilon):
            raise ValueError("the maximum epsilon must be a finite number >= 0")
        if not 0 < self.delta < 1:
            raise ValueError("delta must be in (0, 1)")

    @classmethod
    def from_dict(cls, value: Any) -> BudgetPolicy:
        """A policy as synced (``{"max_epsilon": x, "delta": y}``); raises ValueError."""
        if not isinstance(value, dict) or set(value) != {"max_epsilon", "delta"}:
            raise ValueError("a budget policy has exactly max_epsilon and delta")
        return cls(value["max_epsilon"], value["delta"])


@dataclass(frozen=True)
class RoundRequest:
    """What the aggregator asks of a pod in one round (parsed from its message)."""

    run_id: str
    round: int
    planned_rounds: int
    dp: DPConfig
    version: dict[str, Any]  # the signed model version record
    signature: bytes
    adapter: bytes
    local_epochs: int = 1
    lr: float = 5e-3
    max_examples: int = 256
    seed: int = 0
    precision: str = "fp32"
    peer: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 1 <= self.round <= self.planned_rounds:
            raise ValueError(f"round {self.round} is outside the run's {self.planned_rounds}")
        check_precision(self.precision)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def budget_policy(pod: Pod) -> BudgetPolicy:
    """The user's budget policy (defaults until the user sets one)."""
    rows = dict(pod.store.query("SELECT key, value FROM meta WHERE key IN (?, ?)",
                                (_MAX_EPS_KEY, _DELTA_KEY)))
    return BudgetPolicy(float(rows.get(_MAX_EPS_KEY, DEFAULT_MAX_EPSILON)),
                        float(rows.get(_DELTA_KEY, DEFAULT_DELTA)))


def set_budget_policy(pod: Pod, max_epsilon: float, delta: float | None = None) -> BudgetPolicy:
    """Set the user's maximum epsilon (audited); it applies to every later round."""
    policy = BudgetPolicy(max_epsilon, budget_policy(pod).delta if delta is None else delta)
    from covey.device import _audit

    with pod.store.transaction() as c:
        for key, value in ((_MAX_EPS_KEY, policy.max_epsilon), (_DELTA_KEY, policy.delta)):
            set_meta(c, key, repr(value))
        _audit.append(c, "budget_policy", detail={"max_epsilon": policy.max_epsilon,
                                                  "delta": policy.delta})
    return policy


def ledger_history(pod: Pod) -> list[GaussianRounds]:
    """Every Gaussian release the ledger charges, as accountant segments."""
    rows = pod.store.query(
        "SELECT noise_multiplier, sample_rate, rounds FROM ledger WHERE rounds > 0"
        " AND noise_multiplier > 0 ORDER BY id")
    return [GaussianRounds(float(z), float(q or 1.0), int(n)) for z, q, n in rows]


def _non_private_rows(pod: Pod) -> int:
    rows = pod.store.query("SELECT COUNT(*) FROM ledger WHERE rounds > 0 AND"
                           " (noise_multiplier IS NULL OR noise_multiplier <= 0)")
    return int(rows[0][0])


def spent(pod: Pod, extra: GaussianRounds | None = None) -> float:
    """Epsilon the ledger has spent (plus ``extra``), at the user's delta; inf when a
    non-private release was ever made."""
    policy = budget_policy(pod)
    if _non_private_rows(pod):
        return math.inf
    history = ledger_history(pod) + ([extra] if extra and extra.rounds else [])
    return get_accountant(policy.accountant).epsilon(history, policy.delta)


def charge(pod: Pod, request: RoundRequest) -> GaussianRounds:
    """What this private round adds to the ledger (rounds 0 when already charged)."""
    dp = request.dp
    if dp.mode == "local":
        return GaussianRounds(dp.noise_multiplier, 1.0, 1)
    charged = pod.store.query("SELECT COALESCE(SUM(rounds), 0) FROM ledger WHERE run_id = ?",
                              (request.run_id,))[0][0]
    return GaussianRounds(dp.noise_multiplier, dp.amplified_rate,
                          max(0, request.planned_rounds - int(charged)))


def _check_version(request: RoundRequest, aggregator_key: bytes) -> None:
    try:
        version = ModelVersion.from_dict(request.version)
        verify_version(version, request.adapter, request.signature, aggregator_key)
    except (ValueError, SignatureError) as exc:
        raise RoundRefused("bad_signature", f"refused: {exc}") from None


def check_round(pod: Pod, request: RoundRequest, aggregator_key: bytes) -> GaussianRounds:
    """Every check before training; returns the charge. Raises RoundRefused."""
    if is_stopped(pod.home):
        raise RoundRefused("stopped", "refused: the pod was stopped with `covey stop`")
    if not consented(pod, TRAINING_CONSENT):
        raise RoundRefused("no_consent", "refused: the user has not consented to "
                                         "federated training (covey pod consent)")
    _check_version(request, aggregator_key)
    if not request.dp.private:
        raise RoundRefused("not_private", "refused: the round has no noise or no clipping, "
                                          "so it gives the user no privacy guarantee")
    policy = budget_policy(pod)
    extra = charge(pod, request)
    total = spent(pod, extra)
    if total > policy.max_epsilon:
        raise RoundRefused(
            "budget_exhausted",
            f"refused: this round would bring the user's epsilon to {total:.3g} "
            f"(delta {policy.delta:g}), over their maximum of {policy.max_epsilon:g}")
    return extra


def training_examples(pod: Pod) -> list[Example]:
    """The consented training examples (text stays inside the pod)."""
    from covey.models import Example

    rows = pod.store.query("SELECT prompt, target, created_at FROM training_examples"
                           " WHERE consented = 1 ORDER BY id")
    return [Example(p, t, c) for p, t, c in rows]


def import_examples(pod: Pod, examples: Sequence[Example], source: str = "imported") -> int:
    """Store (context, reply) examples as training examples, consented as the user's
    consent stands now (used to seed simulated pods from a dataset)."""
    granted = int(consented(pod, TRAINING_CONSENT))
    with pod.store.transaction() as c:
        c.executemany("INSERT INTO training_examples (prompt, target, source, consented,"
                      " created_at) VALUES (?, ?, ?, ?, ?)",
                      [(e.context, e.reply, source, granted, e.timestamp or _now())
                       for e in examples])
    return len(examples)


def take_part(pod: Pod, request: RoundRequest, model: TinyLM, tok: ChatTokenizer,
              aggregator_key: bytes, rng: np.random.Generator | None = None
              ) -> tuple[ClientUpdate, float]:
    """Check, train, and record one round; returns the update and the epsilon spent.

    Raises:
        RoundRefused: no consent, no examples, a bad signature, a non-private round, or
            a round that would exceed the user's budget. Nothing is recorded then.
    """
    from covey.device._federated import train_update
    from covey.models import Adapter
    from covey.models._finetune import FinetuneConfig

    extra = check_round(pod, request, aggregator_key)
    examples = training_examples(pod)
    if not examples:
        raise RoundRefused("no_examples", "refused: no consented training examples yet "
                                          "(rate or correct some replies first)")
    try:
        adapter = Adapter.from_bytes(request.adapter)
    except ValueError as exc:
        raise RoundRefused("bad_model", f"refused: the model version is unusable: {exc}"
                           ) from None
    train = FinetuneConfig(epochs=request.local_epochs, lr=request.lr,
                           max_examples=request.max_examples, seed=request.seed,
                           precision=request.precision)
    update = train_update(model, tok, examples, adapter, train, request.dp, rng)
    dp = request.dp
    from covey.device import _audit

    with pod.store.transaction() as c:
        # Checked again inside the write lock: two rounds at once cannot both pass.
        policy, total = budget_policy(pod), spent(pod, extra)
        if total > policy.max_epsilon:
            raise RoundRefused("budget_exhausted", "refused: the budget was spent meanwhile")
        c.execute(
            "INSERT INTO ledger (run_id, round, mode, mechanism, accountant, epsilon, delta,"
            " noise_multiplier, clip_norm, sample_rate, rounds, model_version, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (request.run_id, request.round, dp.mode, "gaussian", policy.accountant,
             total, policy.delta, dp.noise_multiplier, dp.clip_norm,
             extra.sample_rate, extra.rounds, str(request.version.get("id")), _now()))
        _audit.append(c, "federated_update", peer=request.peer, nbytes=update.nbytes,
                      epsilon=total, detail={
                          "run_id": request.run_id, "round": request.round, "mode": dp.mode,
                          "model_version": request.version.get("id"),
                          "examples": update.examples, "clipped": update.clipped,
                          "rounds_charged": extra.rounds})
    return update, total


def refusal_detail(exc: RoundRefused) -> str:
    """The refusal as the JSON reason sent back to the aggregator."""
    return json.dumps({"code": exc.code, "message": str(exc)})
