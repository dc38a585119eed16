"""The round protocol: the message, its signature, the reply and refusals as plain dicts."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from covey.privacy import DPConfig
from covey.protocols import (
    REFUSAL_CODE,
    REFUSALS,
    Refusal,
    RoundMessage,
    RoundReply,
    round_bytes,
)
from covey.protocols._round import ROUND_FIELDS


def _signed(key: Ed25519PrivateKey) -> RoundMessage:
    message = RoundMessage("run-7", 2, 3, DPConfig("central", 1.1, 1.0, 0.5), {"id": "v2"},
                           b"version-sig", b"adapter", 1, 5e-3, 256, 2, "bf16", True)
    return replace(message, round_signature=key.sign(round_bytes(message.settings())))


def test_the_message_survives_its_dict_and_its_signature_covers_the_settings() -> None:
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes_raw()
    message = _signed(key)
    d = message.to_dict()
    assert set(d) == {*ROUND_FIELDS, "version", "signature", "adapter", "round-signature"}
    assert d["version"] == json.dumps({"id": "v2"})
    assert RoundMessage.from_dict(d) == message
    assert RoundMessage.from_dict(d).signed_by(public)
    assert not replace(message, dp=DPConfig("central", 50.0, 1.0, 0.5)).signed_by(public)
    assert not replace(message, round=3).signed_by(public)
    older = {k: v for k, v in d.items() if k not in ("precision", "adaptive-clipping",
                                                      "round-signature")}
    parsed = RoundMessage.from_dict(older)
    assert (parsed.precision, parsed.adaptive_clipping, parsed.round_signature) == (
        "fp32", False, b"")
    assert RoundMessage.from_dict({**d, "added-later": 1}) == message  # unknown keys ignored
    with pytest.raises(KeyError):
        RoundMessage.from_dict({k: v for k, v in d.items() if k != "clip-norm"})
    with pytest.raises(TypeError):
        RoundMessage.from_dict({**d, "adapter": "not bytes"})


def test_the_reply_carries_only_its_metrics_and_info() -> None:
    reply = RoundReply(np.arange(3, dtype=np.float32), "v2", 0, True, "ab" * 16)
    assert reply.metrics() == {"examples": 0, "clipped": 1}
    assert reply.info() == {"version": "v2", "user-token": "ab" * 16}
    back = RoundReply.from_dicts(reply.values, reply.metrics(), reply.info())
    assert (back.version, back.examples, back.clipped, back.user_token) == (
        "v2", 0, True, "ab" * 16)
    with pytest.raises(KeyError):
        RoundReply.from_dicts(reply.values, {"examples": 0}, reply.info())


def test_a_refusal_travels_as_json_under_its_error_code() -> None:
    refusal = Refusal("budget_exhausted", "refused: the budget is spent")
    assert refusal.code in REFUSALS
    assert Refusal.from_error(REFUSAL_CODE, refusal.reason()) == refusal
    assert Refusal.from_error(REFUSAL_CODE, "not json") == Refusal("error", "not json")
    assert Refusal.from_error(500, refusal.reason()).code == "error"
