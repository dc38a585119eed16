"""The round's settings, signed by the aggregator: what a pod checks before it charges
its user's budget for a round or a run.

The model version's signature says *which* adapter to train; this one says *under which
privacy parameters* and *for which run and round*. Without it, anyone who could hand a
pod a message with a validly signed model version (a process of the same user at the
pod's round socket, or someone replaying a captured message) could ask for a round with
a huge noise multiplier and a tiny sampling rate, charged at almost nothing, and get the
clipped update back.

The signed bytes are ``b"covey-round-v1\\0"`` followed by the canonical JSON (sorted keys,
no spaces) of the settings, so they can be confused neither with a model version (JSON
starting with ``{``) nor with an app signature (40 bytes).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = ["ROUND_FIELDS", "round_bytes", "round_settings", "verify_round"]

_CONTEXT = b"covey-round-v1\0"

#: What the signature covers (the round message's keys).
ROUND_FIELDS = ("run-id", "round", "planned-rounds", "mode", "noise-multiplier", "clip-norm",
                "sample-rate", "delta", "accountant", "adaptive-clipping", "local-epochs",
                "lr", "max-examples", "seed", "precision")


def round_settings(r: Any) -> dict[str, Any]:
    """The signed settings of a round, from anything with a round's attributes (the
    aggregator's payload, the pod's parsed request), typed as the message carries them."""
    dp = r.dp
    return {"run-id": str(r.run_id), "round": int(r.round),
            "planned-rounds": int(r.planned_rounds), "mode": str(dp.mode),
            "noise-multiplier": float(dp.noise_multiplier), "clip-norm": float(dp.clip_norm),
            "sample-rate": float(dp.sample_rate), "delta": float(dp.delta),
            "accountant": str(dp.accountant), "adaptive-clipping": bool(r.adaptive_clipping),
            "local-epochs": int(r.local_epochs), "lr": float(r.lr),
            "max-examples": int(r.max_examples), "seed": int(r.seed),
            "precision": str(r.precision)}


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
