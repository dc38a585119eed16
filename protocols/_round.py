"""The round protocol between the aggregator and the pods (``ROUND-PROTOCOL.md``).

A round is one message, :class:`RoundMessage`, the same for every sampled pod: the run
and round, the DP settings, the signed model version, the local training settings, and
the aggregator's signature over the settings. A pod answers with a :class:`RoundReply`
(its released update and only what its mechanism lets it say beside it) or a
:class:`Refusal` (a code from :data:`REFUSALS` and a sentence for a person). Every part
converts to and from the plain dicts Flower's ConfigRecord and MetricRecord carry; the
Flower modules only wrap them. No Flower import here.

Why the settings are signed. The model version's signature says *which* adapter to
train; this one says *under which privacy parameters* and *for which run and round*.
Without it, anyone who could hand a pod a message with a validly signed model version
(a process of the same user at the pod's round socket, or someone replaying a captured
message) could ask for a round with a huge noise multiplier and a tiny sampling rate,
charged at almost nothing, and get the clipped update back.

The signed bytes are ``b"covey-round-v1\\0"`` followed by the canonical JSON (sorted keys,
no spaces) of the settings, so they can be confused neither with a model version (JSON
starting with ``{``) nor with an app signature (40 bytes).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from covey.privacy import DPConfig

__all__ = ["REFUSALS", "REFUSAL_CODE", "ROUND_FIELDS", "ROUND_PROTOCOL_VERSION", "Refusal",
           "RoundMessage", "RoundReply", "round_bytes", "verify_round"]

#: The version of ``ROUND-PROTOCOL.md`` this module implements.
ROUND_PROTOCOL_VERSION = 1

_CONTEXT = b"covey-round-v1\0"

#: What the signature covers (the round message's keys).
ROUND_FIELDS = ("run-id", "round", "planned-rounds", "mode", "noise-multiplier", "clip-norm",
                "sample-rate", "delta", "accountant", "adaptive-clipping", "local-epochs",
                "lr", "max-examples", "seed", "precision")

#: The error code of a pod's refusal; the error's reason is :meth:`Refusal.reason`.
REFUSAL_CODE = 4001

#: Why a pod refuses, by code (the aggregator counts refusals by code).
REFUSALS: dict[str, str] = {
    "stopped": "the pod was stopped with `covey stop`",
    "no_consent": "the user has not consented (to federated training, or to the source "
                  "a statistic needs)",
    "bad_signature": "the model version or the round's settings are not signed by the "
                     "pinned aggregator key",
    "not_private": "the round has no noise or no clipping",
    "other_device": "another of the user's devices answers this round for them",
    "replayed": "this pod already answered this round",
    "budget_exhausted": "the round would take the user past their maximum epsilon",
    "run_changed": "the run's privacy parameters differ from those it started with",
    "ledger_invalid": "the pod's privacy ledger does not verify",
    "no_examples": "no consented training examples (a mechanism that does not answer "
                   "for an empty pod)",
    "bad_model": "the model version's adapter is unusable",
    "malformed": "the message could not be read",
    "pod_error": "the pod could not answer",
}


@dataclass(frozen=True)
class RoundMessage:
    """What every sampled pod receives in a round (the same for all of them)."""

    run_id: str
    round: int
    planned_rounds: int
    dp: DPConfig
    version: dict[str, Any]  # the signed model version record
    signature: bytes  # the aggregator's, over the version
    adapter: bytes  # the version's adapter, as signed
    local_epochs: int
    lr: float
    max_examples: int
    seed: int  # of the pods' local training (batch order)
    precision: str = "fp32"
    adaptive_clipping: bool = False  # C moves between rounds (pods then pin all but C)
    round_signature: bytes = b""  # the aggregator's, over settings()

    def settings(self) -> dict[str, Any]:
        """The signed settings of the round (:data:`ROUND_FIELDS`), typed as the message
        carries them."""
        dp = self.dp
        return {"run-id": str(self.run_id), "round": int(self.round),
                "planned-rounds": int(self.planned_rounds), "mode": str(dp.mode),
                "noise-multiplier": float(dp.noise_multiplier),
                "clip-norm": float(dp.clip_norm), "sample-rate": float(dp.sample_rate),
                "delta": float(dp.delta), "accountant": str(dp.accountant),
                "adaptive-clipping": bool(self.adaptive_clipping),
                "local-epochs": int(self.local_epochs), "lr": float(self.lr),
                "max-examples": int(self.max_examples), "seed": int(self.seed),
                "precision": str(self.precision)}

    def signed_by(self, public_key: bytes) -> bool:
        """Whether the round's settings carry the aggregator's signature."""
        return verify_round(self.settings(), self.round_signature, public_key)

    def to_dict(self) -> dict[str, Any]:
        """The message as one flat dict (a ConfigRecord's content): the version as JSON,
        the signatures and the adapter as bytes."""
        return {**self.settings(), "version": json.dumps(self.version),
                "signature": self.signature, "adapter": self.adapter,
                "round-signature": self.round_signature}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **extra: Any) -> Self:
        """The message (or a subclass with ``extra`` fields) from :meth:`to_dict`'s dict.

        Raises:
            KeyError, TypeError, ValueError: a field is missing or of the wrong type.
        """
        dp = DPConfig(mode=d["mode"], noise_multiplier=float(d["noise-multiplier"]),
                      clip_norm=float(d["clip-norm"]), sample_rate=float(d["sample-rate"]),
                      delta=float(d["delta"]), accountant=str(d["accountant"]))
        signature, adapter = d["signature"], d["adapter"]
        if not isinstance(signature, bytes) or not isinstance(adapter, bytes):
            raise TypeError("signature and adapter must be bytes")
        return cls(run_id=str(d["run-id"]), round=int(d["round"]),
                   planned_rounds=int(d["planned-rounds"]), dp=dp,
                   version=json.loads(str(d["version"])), signature=signature,
                   adapter=adapter, local_epochs=int(d["local-epochs"]), lr=float(d["lr"]),
                   max_examples=int(d["max-examples"]), seed=int(d["seed"]),
                   precision=str(d.get("precision", "fp32")),
                   adaptive_clipping=bool(d.get("adaptive-clipping", False)),
                   round_signature=bytes(d.get("round-signature", b"")), **extra)


@dataclass(frozen=True)
class RoundReply:
    """A pod's answer to a round: its released update and what it may say beside it."""

    values: np.ndarray  # float32, flat
    version: str  # the id of the model version it trained
    examples: int = 0  # FedAvg's weight; 0 in private rounds
    clipped: bool = False  # the clipping bit, for a mechanism that counts it
    user_token: str = ""  # the same for every pod of one user in one round

    def metrics(self) -> dict[str, Any]:
        """The numbers beside the update (a MetricRecord's content)."""
        return {"examples": int(self.examples), "clipped": int(self.clipped)}

    def info(self) -> dict[str, Any]:
        """The strings beside the update (a ConfigRecord's content)."""
        return {"version": self.version, "user-token": self.user_token}

    @classmethod
    def from_dicts(cls, values: np.ndarray, metrics: Mapping[str, Any],
                   info: Mapping[str, Any]) -> RoundReply:
        """The reply from its update and :meth:`metrics` and :meth:`info`'s dicts.

        Raises:
            KeyError, TypeError, ValueError: a field is missing or of the wrong type.
        """
        return cls(np.asarray(values), version=str(info["version"]),
                   examples=int(metrics["examples"]), clipped=bool(metrics["clipped"]),
                   user_token=str(info.get("user-token", "")))


@dataclass(frozen=True)
class Refusal:
    """A pod's refusal: a code of :data:`REFUSALS` and a sentence for a person (never the
    user's epsilon or maximum)."""

    code: str
    message: str

    def reason(self) -> str:
        """The refusal as the error's reason (JSON: ``{"code", "message"}``)."""
        return json.dumps({"code": self.code, "message": self.message})

    @classmethod
    def from_error(cls, code: int, reason: str) -> Refusal:
        """What an error reply says: a pod's refusal (:data:`REFUSAL_CODE` with a readable
        reason), or code ``error`` with the reason as the message."""
        if code == REFUSAL_CODE:
            try:
                detail = json.loads(reason)
                return cls(str(detail["code"]), str(detail["message"]))
            except (ValueError, KeyError, TypeError):
                pass
        return cls("error", reason)


def round_bytes(settings: Mapping[str, Any]) -> bytes:
    """The bytes the aggregator signs for a round with ``settings`` (the message's keys).

    Raises:
        KeyError: a field of :data:`ROUND_FIELDS` is missing.
    """
    return _CONTEXT + json.dumps({k: settings[k] for k in ROUND_FIELDS}, sort_keys=True,
                                 separators=(",", ":")).encode()


def verify_round(settings: Mapping[str, Any], signature: bytes, public_key: bytes) -> bool:
    """Whether ``signature`` is the aggregator's over these round settings."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature,
                                                              round_bytes(settings))
    except (InvalidSignature, ValueError, KeyError, TypeError):
        return False
    return True
