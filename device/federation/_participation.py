"""A pod taking part in a federated round: consent, signature, budget, training, ledger.

The Flower ClientApp (``covey.device.clientapp``) is a thin adapter around
:func:`take_part`, which owns every decision a pod makes about a round:

1. the user has granted the ``federated_training`` consent;
2. the model version the aggregator sent is signed by the pinned aggregator key and its
   bytes match the signed hash;
3. the round is private, keeps the privacy parameters its run started with on any of
   the user's pods (mode, z, q, T, delta, and C unless the run adapts it), and fits the
   user's budget: the user's ledger (:class:`covey.privacy.Ledger`, every pod of the
   user) composed with what this round charges stays within the user's maximum;
4. it trains (the pure :func:`covey.device.federation._federated.train_update`), and records the
   ledger entry and the audit entry (what, to whom, bytes, epsilon) in one transaction
   *before* the update is handed over for sending.

What a round charges. In ``central`` mode the aggregator Poisson-samples pods at rate q
for a run of T planned rounds; a user's privacy loss is that of all T rounds whether or
not the pod is sampled in each, so the user's first participation in a run (on any of
their pods) charges the whole (z, q, T) and later ones charge nothing more (a round past
T is refused). In ``local`` mode the pod cannot verify any sampling: each participation
charges one unamplified Gaussian release at the replace-one sensitivity 2C, and a pod
with no examples sends a noised zero update rather than a refusal that would tell the
aggregator it has none.

Refusals travel to the aggregator: they say which check failed, never the user's epsilon
or maximum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from covey._time import utc_timestamp
from covey.device._pod import Pod
from covey.device._stop import is_stopped
from covey.device.assistant._feedback import TRAINING_CONSENT, consented
from covey.device.federation._budget import (
    DEFAULT_DELTA,
    DEFAULT_MAX_EPSILON,
    DELTA_KEY,
    MAX_EPS_KEY,
    budget_policy,
    pod_ledger,
    set_budget_policy,
)
from covey.errors import CoveyError
from covey.models import check_precision
from covey.privacy import (
    MECHANISMS,
    BudgetExceeded,
    BudgetPolicy,
    Ledger,
    LedgerTampered,
    NoiseSource,
    Release,
    RunChanged,
    mechanism,
)
from covey.protocols import ModelVersion, Refusal, RoundMessage, SignatureError, verify_version

if TYPE_CHECKING:
    from covey.device.federation._federated import ClientUpdate
    from covey.models import ChatTokenizer, Example, TinyLM

__all__ = [
    "DEFAULT_DELTA",
    "DEFAULT_MAX_EPSILON",
    "BudgetPolicy",
    "RoundRefused",
    "RoundRequest",
    "budget_policy",
    "import_examples",
    "join_run",
    "set_budget_policy",
    "spent",
    "take_part",
]

# Older names, kept for the modules that still import them from here.
_MAX_EPS_KEY, _DELTA_KEY = MAX_EPS_KEY, DELTA_KEY


class RoundRefused(CoveyError):
    """The pod declines a round; ``code`` says why, the message says it to a person."""

    exit_code = 2

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class RoundRequest(RoundMessage):
    """A round's message as a pod received it: the message and who sent it."""

    peer: str = ""

    def __post_init__(self) -> None:
        if not 1 <= self.round <= self.planned_rounds:
            raise ValueError(f"round {self.round} is outside the run's {self.planned_rounds}")
        check_precision(self.precision)

    @classmethod
    def received(cls, message: RoundMessage, peer: str) -> RoundRequest:
        """``message`` as it reached the pod from ``peer``.

        Raises:
            ValueError: the round is outside the run, or the precision is unknown.
        """
        return cls(**{f.name: getattr(message, f.name) for f in fields(RoundMessage)},
                   peer=peer)



def spent(pod: Pod) -> float:
    """The user's epsilon spent, at the user's delta (inf after a release without noise)."""
    return pod_ledger(pod).spent()


def round_release(request: RoundRequest, ledger: Ledger) -> Release:
    """What this round adds to the user's ledger (rounds 0 when the run was charged)."""
    dp = request.dp
    rounds = max(0, request.planned_rounds - ledger.charged_rounds(request.run_id)
                 ) if mechanism(dp).charges_run else 1
    return Release(kind="federated_update", run_id=request.run_id, round=request.round,
                   mode=dp.mode, noise_multiplier=dp.noise_multiplier, clip_norm=dp.clip_norm,
                   sensitivity=dp.sensitivity, sample_rate=dp.amplified_rate,
                   planned_rounds=request.planned_rounds, rounds=rounds, run_delta=dp.delta,
                   adaptive=request.adaptive_clipping,
                   model_version=str(request.version.get("id")), peer=request.peer)


def refusal(exc: BudgetExceeded | RunChanged | LedgerTampered) -> RoundRefused:
    """A ledger's refusal as the round's, with a code the aggregator counts."""
    if isinstance(exc, BudgetExceeded):
        return RoundRefused("budget_exhausted", str(exc))
    if isinstance(exc, RunChanged):
        return RoundRefused("run_changed", str(exc))
    return RoundRefused("ledger_invalid", "refused: the pod's privacy ledger does not verify")


def round_identity(pod: Pod, run_id: str, round: int) -> tuple[bool, str]:
    """(whether this pod answers this round for its user, the user's token for it).

    One training identity per user per round: among the user's paired devices that are
    not revoked, a keyed hash of the run and round picks one, so a user with k pods is
    included with the aggregator's rate q, not about kq; the token (a keyed hash too)
    is the same on every pod of the user, so the aggregator refuses a second update
    from the same user in a round even while the pods disagree about the device list.
    Both keys derive from the user key, which only the user's pods hold: the aggregator
    can neither predict the pick nor link a user's tokens across rounds. A pod that
    was never paired is its own user and answers every round.
    """
    import hashlib
    import hmac

    from covey.device.sync._sync import PodState

    state = PodState(pod)
    key = state.user_key()
    if key is None:
        secret = pod.identity.private_key.private_bytes_raw()
        devices = [pod.identity.device_id]
    else:
        secret = key.private_bytes()
        devices = sorted(d.device_id for d in state.devices() if d.current)
        if pod.identity.device_id not in devices:
            devices = [pod.identity.device_id]

    def keyed(label: str) -> bytes:
        message = f"covey-round-{label}\0{run_id}\0{round}".encode()
        return hmac.new(secret, message, hashlib.sha256).digest()

    pick = devices[int.from_bytes(keyed("pick")[:8], "big") % len(devices)]
    return pick == pod.identity.device_id, keyed("token")[:16].hex()


def _check_version(request: RoundRequest, aggregator_key: bytes) -> None:
    try:
        version = ModelVersion.from_dict(request.version)
        verify_version(version, request.adapter, request.signature, aggregator_key)
    except (ValueError, SignatureError) as exc:
        raise RoundRefused("bad_signature", f"refused: {exc}") from None
    if not request.signed_by(aggregator_key):
        raise RoundRefused("bad_signature", "refused: the round's settings are not signed by "
                                            "the aggregator")


def _check_not_answered(ledger: Ledger, request: RoundRequest, device_id: str) -> None:
    """A pod answers each round of a run once: a replayed round (a captured message sent
    again, or one a local process got hold of) would give out another update, or another
    noised one to average, for nothing."""
    if any(e.device_id == device_id and e.release.run_id == request.run_id
           and e.release.round == request.round and e.release.kind == "federated_update"
           for e in ledger.history()):
        raise RoundRefused("replayed", "refused: this pod already answered this round")


def check_round(pod: Pod, request: RoundRequest, aggregator_key: bytes,
                announced: bool = False) -> tuple[Ledger, Release]:
    """Every check before training (or, ``announced``, before charging a run the pod was
    told of); returns the ledger and the charge. Raises RoundRefused."""
    if is_stopped(pod.home):
        raise RoundRefused("stopped", "refused: the pod was stopped with `covey stop`")
    if not consented(pod, TRAINING_CONSENT):
        raise RoundRefused("no_consent", "refused: the user has not consented to "
                                         "federated training (covey pod consent)")
    _check_version(request, aggregator_key)
    if not request.dp.private:
        raise RoundRefused("not_private", "refused: the round has no noise or no clipping, "
                                          "so it gives the user no privacy guarantee")
    if not announced and not round_identity(pod, request.run_id, request.round)[0]:
        raise RoundRefused("other_device", "refused: another of the user's devices answers "
                                           "this round for them")
    ledger = pod_ledger(pod)
    release = round_release(request, ledger)
    if announced:
        release = replace(release, round=0)  # a charge, not an answer to round 1
    else:
        _check_not_answered(ledger, request, pod.identity.device_id)
    try:
        ledger.check(release)
    except (BudgetExceeded, RunChanged, LedgerTampered) as exc:
        raise refusal(exc) from None
    return ledger, release


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
                      [(e.context, e.reply, source, granted, e.timestamp or utc_timestamp())
                       for e in examples])
    return len(examples)


def take_part(pod: Pod, request: RoundRequest, model: TinyLM, tok: ChatTokenizer,
              aggregator_key: bytes, noise: NoiseSource | None = None
              ) -> tuple[ClientUpdate, float]:
    """Check, train, and record one round; returns the update and the user's epsilon.

    Raises:
        RoundRefused: no consent, no examples (central mode), a bad signature, a
            non-private round, a run that changed its parameters, or a round that would
            exceed the user's budget. Nothing is recorded then.
    """
    from covey.device.federation._federated import noise_only_update, train_update
    from covey.device.store import _audit
    from covey.models import Adapter, FinetuneConfig

    ledger, release = check_round(pod, request, aggregator_key)
    examples = training_examples(pod)
    if not examples and not mechanism(request.dp).answers_empty:
        raise RoundRefused("no_examples", "refused: no consented training examples yet "
                                          "(rate or correct some replies first)")
    try:
        adapter = Adapter.from_bytes(request.adapter)
    except ValueError as exc:
        raise RoundRefused("bad_model", f"refused: the model version is unusable: {exc}"
                           ) from None
    if examples:
        train = FinetuneConfig.for_round(request)
        update = train_update(model, tok, examples, adapter, train, request.dp, noise)
    else:
        update = noise_only_update(adapter, request.dp, noise)
    release = replace(release, nbytes=update.nbytes)

    def audit(c: Any, entry: Any) -> None:
        _audit.append(c, "federated_update", peer=request.peer, nbytes=update.nbytes,
                      epsilon=entry.epsilon, detail={
                          "run_id": request.run_id, "round": request.round,
                          "mode": request.dp.mode, "model_version": request.version.get("id"),
                          "examples": update.examples, "clipped": update.clipped,
                          "rounds_charged": release.rounds})

    try:
        # Checked again inside the write lock: two rounds at once cannot both pass.
        entry = ledger.spend(release, audit)
    except (BudgetExceeded, RunChanged, LedgerTampered) as exc:
        raise refusal(exc) from None
    token = round_identity(pod, request.run_id, request.round)[1]
    return replace(update, user_token=token), entry.epsilon


def join_run(pod: Pod, request: RoundRequest, aggregator_key: bytes) -> float:
    """Charge a central run the aggregator announced before its first round; returns the
    user's epsilon.

    Sampling amplifies privacy only as a guarantee over the draw: the user's loss is the
    run's (z, q, T) whether or not this pod is ever sampled, so every pod that could be
    sampled charges it now, not only the pods the draw picks. Nothing is trained or
    sent. A pod that was not told (it connected later) charges the run at its first
    round, as before.

    Raises:
        RoundRefused: the same checks as a round (consent, signature, privacy, pinned
            parameters, budget); the pod then refuses the run's rounds too.
    """
    from covey.device.store import _audit

    if not MECHANISMS[request.dp.mode].charges_run:  # by mode: a non-private run is refused below
        raise RoundRefused("malformed", "refused: only central runs are announced")
    ledger, release = check_round(pod, request, aggregator_key, announced=True)
    if not release.rounds:
        return ledger.spent()

    def audit(c: Any, entry: Any) -> None:
        _audit.append(c, "federated_run", peer=request.peer, epsilon=entry.epsilon,
                      detail={"run_id": request.run_id, "rounds_charged": release.rounds})

    try:
        return ledger.spend(release, audit).epsilon
    except (BudgetExceeded, RunChanged, LedgerTampered) as exc:
        raise refusal(exc) from None


def refusal_detail(exc: RoundRefused) -> str:
    """The refusal as the reason sent back to the aggregator."""
    return Refusal(exc.code, str(exc)).reason()
