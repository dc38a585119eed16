"""The pod's Flower ClientApp: a thin adapter from Flower messages to ``take_part``.

The SuperNode that ``covey pod join`` starts runs this ClientApp only as part of covey's
app signed by the aggregator (its ``--trusted-entities`` pin the aggregator's key), and
the ClientApp holds no key: it relays each message to the pod's round agent over the
Unix socket its node config names (``round-socket``). The agent's worker, with the agent
the only processes that hold the pod's data key, answers it with :func:`answer` (see
``_round_agent``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from covey.device.federation._participation import (
    RoundRefused,
    RoundRequest,
    refusal_detail,
    take_part,
)
from covey.errors import CoveyError
from covey.privacy import DPConfig
from covey.protocols import REFUSAL_CODE, RoundReply

__all__ = ["answer", "app", "reply_message"]

_MODEL: dict[str, Any] = {}


def _model() -> tuple[Any, Any]:
    if "model" not in _MODEL:
        from covey.models import load_model

        _MODEL["model"], _MODEL["tok"], _ = load_model()
    return _MODEL["model"], _MODEL["tok"]


def _refuse(msg: Message, code: str, text: str) -> Message:
    return Message(Error(code=REFUSAL_CODE, reason=refusal_detail(RoundRefused(code, text))),
                   reply_to=msg)


def _refused(msg: Message, open_pod: Callable[[], Any], exc: RoundRefused, peer: str
             ) -> Message:
    """A pod's refusal, which leaves the pod too: recorded in its audit log (the code and
    the bytes sent) before it is handed over."""
    reply = _refuse(msg, exc.code, str(exc))
    try:
        with open_pod() as pod:
            pod.audit("round_refused", peer=peer, nbytes=len(str(reply.error.reason)),
                      detail={"code": exc.code, "message_type": msg.metadata.message_type})
    except (CoveyError, OSError):
        pass  # the pod could not be opened to record it: the refusal says nothing of it
    return reply


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Hand the round to the pod's round agent, which alone can open the pod."""
    return _relay(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Hand the statistics request to the pod's round agent."""
    return _relay(msg, context)


def _relay(msg: Message, context: Context) -> Message:
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage
    from google.protobuf.message import DecodeError

    from covey.device.federation._round_agent import ask

    try:
        raw = ask(Path(str(context.node_config["round-socket"])),
                  message_to_proto(msg).SerializeToString())
        proto = ProtoMessage()
        proto.ParseFromString(raw)
        reply = message_from_proto(proto)
    except (KeyError, OSError, ValueError, DecodeError) as exc:
        return _refuse(msg, "pod_error", "refused: the pod's round agent did not answer "
                                         f"({type(exc).__name__})")
    return Message(reply.error if reply.has_error() else reply.content, reply_to=msg)


def answer(msg: Message, open_pod: Callable[[], Any], aggregator_key: bytes,
           peer: str) -> Message:
    """The pod's reply to one message from the aggregator; the round agent's worker runs
    this.

    Args:
        open_pod: unlocks the pod (the worker opens it with the data key it holds).
        aggregator_key: the pinned Ed25519 key the model version must be signed with.
        peer: the SuperLink's address, for the audit log.
    """
    kind = msg.metadata.message_type.split(".")[0]
    if kind == "train":
        return _train(msg, open_pod, aggregator_key, peer)
    if kind == "query" and "round" in msg.content.config_records:
        return _announced(msg, open_pod, aggregator_key, peer)
    if kind == "query":
        return _query(msg, open_pod, peer)
    return _refuse(msg, "malformed", "refused: unknown message type")


def _train(msg: Message, open_pod: Callable[[], Any], key: bytes, peer: str) -> Message:
    """Take part in a round, or refuse it with a reason the aggregator can count."""
    try:
        request = RoundRequest.from_dict(dict(msg.content.config_records["round"]), peer=peer)
    except (KeyError, TypeError, ValueError) as exc:
        return _refuse(msg, "malformed", f"refused: malformed round message ({type(exc).__name__})")
    try:
        with open_pod() as pod:
            model, tok = _model()
            update, _ = take_part(pod, request, model, tok, key)
    except RoundRefused as exc:
        return _refused(msg, open_pod, exc, peer)
    except (CoveyError, OSError, KeyError) as exc:
        return _refuse(msg, "pod_error", _pod_error(exc))
    return reply_message(msg, update, request.dp, str(request.version.get("id")))


def _announced(msg: Message, open_pod: Callable[[], Any], key: bytes, peer: str) -> Message:
    """Charge the run the aggregator announced (its first round's message, as a query),
    or refuse it; nothing about the pod's data is sent back."""
    from covey.device.federation._participation import join_run

    try:
        request = RoundRequest.from_dict(dict(msg.content.config_records["round"]), peer=peer)
    except (KeyError, TypeError, ValueError) as exc:
        return _refuse(msg, "malformed", f"refused: malformed run message ({type(exc).__name__})")
    try:
        with open_pod() as pod:
            join_run(pod, request, key)
    except RoundRefused as exc:
        return _refused(msg, open_pod, exc, peer)
    except (CoveyError, OSError, KeyError) as exc:
        return _refuse(msg, "pod_error", _pod_error(exc))
    return Message(RecordDict({"run": ConfigRecord({"charged": True})}), reply_to=msg)


def _pod_error(exc: BaseException) -> str:
    """A failure's message for the aggregator: its kind only (an error's text can name
    paths in the user's home, so it stays in the pod's own log)."""
    return f"refused: the pod could not answer ({type(exc).__name__})"


def reply_message(msg: Message, update: Any, dp: DPConfig, version_id: str) -> Message:
    """A pod's answer to a train message: its clipped (and noised) update and only what
    :meth:`ClientUpdate.reported` allows beside it (no epsilon, losses or, in private
    rounds, example counts).

    The simulated pods of ``covey simulate --engine flower`` answer with this too."""
    said = update.reported(dp)
    reply = RoundReply(update.delta, version_id, said["examples"], bool(said["clipped"]),
                       update.user_token)
    return Message(RecordDict({
        "update": ArrayRecord([reply.values]),
        "metrics": MetricRecord(reply.metrics()),
        "info": ConfigRecord(reply.info()),
    }), reply_to=msg)


def _query(msg: Message, open_pod: Callable[[], Any], peer: str) -> Message:
    """Answer the aggregator's request for shared statistics, only under DP.

    The one statistic defined is ``usage_hours`` (config record ``stats``: ``kind``,
    ``run-id``, ``noise-multiplier``): the pod's hour-of-day usage histogram through the
    Gaussian mechanism, charged to its ledger (:func:`usage_histogram`).
    """
    from covey.device.context._context import usage_histogram

    try:
        cfg = dict(msg.content.config_records["stats"])
        if cfg["kind"] != "usage_hours":
            raise ValueError("unknown statistic")
        run_id, z = str(cfg["run-id"]), float(str(cfg["noise-multiplier"]))
    except (KeyError, TypeError, ValueError) as exc:
        return _refuse(msg, "malformed", f"refused: malformed statistics request "
                                         f"({type(exc).__name__})")
    try:
        with open_pod() as pod:
            release = usage_histogram(pod, z, run_id, peer)
    except RoundRefused as exc:
        return _refused(msg, open_pod, exc, peer)
    except (CoveyError, OSError, KeyError) as exc:
        return _refuse(msg, "pod_error", _pod_error(exc))
    return Message(RecordDict({
        "hours": ArrayRecord([np.asarray(release.hours, dtype=np.float64)]),
        "metrics": MetricRecord({"epsilon": release.release_epsilon, "delta": release.delta,
                                 "noise_multiplier": release.noise_multiplier,
                                 "sensitivity": release.sensitivity}),
    }), reply_to=msg)
