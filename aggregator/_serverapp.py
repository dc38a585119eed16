"""The aggregator's Flower ServerApp: ``run_federated`` over real SuperNodes.

``covey train`` starts it with ``flwr run`` on the aggregator's SuperLink; every setting
comes in the run config (see ``aggregator/flower_app/pyproject.toml``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from covey._time import utc_timestamp
from covey.aggregator._rounds import PodReply, RunConfig, run_federated
from covey.privacy import USAGE_SENSITIVITY, AdaptiveClipping, DPConfig
from covey.protocols import Refusal, RoundMessage, RoundReply

__all__ = ["app", "round_record", "run_config_from"]

_log = logging.getLogger(__name__)


def run_config_from(rc: dict[str, Any]) -> RunConfig:
    """The run's settings from Flower's run config (keys spelled with dashes)."""
    adaptive = (AdaptiveClipping(float(rc["adaptive-quantile"]))
                if float(rc.get("adaptive-quantile", 0.0)) > 0 else None)
    dp = DPConfig(mode=str(rc["mode"]), noise_multiplier=float(rc["noise-multiplier"]),  # type: ignore[arg-type]
                  clip_norm=float(rc["clip-norm"]), sample_rate=float(rc["sample-rate"]),
                  delta=float(rc["delta"]), accountant=str(rc["accountant"]), adaptive=adaptive)
    target = float(rc.get("target-epsilon", 0.0))
    return RunConfig(rounds=int(rc["rounds"]), dp=dp, target_epsilon=target or None,
                     min_pods=int(rc["min-pods"]), round_timeout=float(rc["round-timeout"]),
                     wait_timeout=float(rc["wait-timeout"]),
                     local_epochs=int(rc["local-epochs"]), lr=float(rc["lr"]),
                     max_examples=int(rc["max-examples"]),
                     eval_examples=int(rc["eval-examples"]), seed=int(rc["seed"]),
                     precision=str(rc.get("precision", "fp32")))


def round_record(message: RoundMessage) -> RecordDict:
    """A round's message as Flower records (the adapter travels as the signed bytes)."""
    return RecordDict({"round": ConfigRecord(message.to_dict())})


def _refusal(msg: Message) -> Refusal:
    """A reply's error: a pod's refusal, or code "error"."""
    return Refusal.from_error(int(msg.error.code), str(msg.error.reason or ""))


def _reply(msg: Message, version: str) -> PodReply:
    node = int(msg.metadata.src_node_id)
    if msg.has_error():
        refusal = _refusal(msg)
        return PodReply(node, refusal=refusal.code, message=refusal.message)
    try:
        reply = RoundReply.from_dicts(
            msg.content.array_records["update"].to_numpy_ndarrays()[0],
            dict(msg.content.metric_records["metrics"]),
            msg.content.config_records["info"])
        return PodReply(node, values=reply.values, version=reply.version,
                        examples=reply.examples, clipped=reply.clipped,
                        user_token=reply.user_token)
    except (KeyError, IndexError, TypeError, ValueError):
        # A reply we cannot read is an update the strategy rejects as malformed.
        return PodReply(node, values=np.empty(0, np.float32), version=version, examples=0)


class FlowerTransport:
    """Reaches pods through the SuperLink's grid."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def node_ids(self) -> list[int]:
        return [int(n) for n in self.grid.get_node_ids()]

    def train(self, nodes: Sequence[int], payload: RoundMessage, timeout: float
              ) -> list[PodReply]:
        content = round_record(payload)
        messages = [Message(content, dst_node_id=n, message_type="train",
                            group_id=f"{payload.run_id}:{payload.round}") for n in nodes]
        replies = self.grid.send_and_receive(messages, timeout=timeout)
        return [_reply(m, str(payload.version.get("id"))) for m in replies]

    def announce(self, nodes: Sequence[int], payload: RoundMessage, timeout: float
                 ) -> list[PodReply]:
        """Tell every pod of the run before its first round, so each charges it."""
        content = round_record(payload)
        messages = [Message(content, dst_node_id=n, message_type="query",
                            group_id=f"{payload.run_id}:announce") for n in nodes]
        replies = self.grid.send_and_receive(messages, timeout=timeout)
        return [PodReply(int(m.metadata.src_node_id),
                         refusal=_refusal(m).code if m.has_error() else "") for m in replies]


def _usage_reply(msg: Message) -> tuple[str, list[float] | None, float]:
    """(refusal code or "", the noisy histogram, the epsilon of that release alone)."""
    if msg.has_error():
        return _refusal(msg).code, None, 0.0
    try:
        hours = msg.content.array_records["hours"].to_numpy_ndarrays()[0]
        epsilon = float(str(dict(msg.content.metric_records["metrics"])["epsilon"]))
        if hours.shape != (24,) or not np.all(np.isfinite(hours)):
            return "malformed", None, 0.0
        return "", [float(v) for v in hours], epsilon
    except (KeyError, IndexError, TypeError, ValueError):
        return "malformed", None, 0.0


def usage_statistics(transport: FlowerTransport, cfg: RunConfig, run_id: str,
                     record_path: Path) -> dict[str, Any]:
    """Ask every connected pod for its DP hour-of-day usage histogram; write the record.

    Each pod adds its own Gaussian noise before anything leaves it (local DP, charged to
    its own ledger); the mean computed here is post-processing and costs nothing more.
    """
    from collections import Counter

    from covey._files import write_atomic
    from covey.aggregator._rounds import _wait_for_pods

    nodes = _wait_for_pods(transport, cfg)
    z = cfg.dp.noise_multiplier
    content = RecordDict({"stats": ConfigRecord({"kind": "usage_hours", "run-id": run_id,
                                                 "noise-multiplier": z})})
    messages = [Message(content, dst_node_id=n, message_type="query", group_id=run_id)
                for n in nodes]
    replies = [_usage_reply(m) for m in
               transport.grid.send_and_receive(messages, timeout=cfg.round_timeout)]
    answers = [(hours, eps) for code, hours, eps in replies if not code and hours]
    refused = Counter(code for code, _, _ in replies if code)
    mean = (np.mean([h for h, _ in answers], axis=0).tolist() if answers else [])
    record = {
        "run_id": run_id, "task": "usage-stats", "started_at": utc_timestamp("seconds"),
        "finished_at": utc_timestamp("seconds"),
        "status": "completed" if len(answers) >= cfg.min_pods else "failed",
        "mechanism": {"name": "gaussian", "dp": "local, user-level", "statistic":
                      "hour-of-day usage fractions (24 bins, L1 norm 1)",
                      "sensitivity_l2": USAGE_SENSITIVITY, "noise_multiplier": z,
                      "noise_std": z * USAGE_SENSITIVITY,
                      "accounting": "each pod charges one Gaussian release to its ledger"},
        "asked": len(nodes), "answered": len(answers), "refused": dict(refused),
        "release_epsilons": sorted(eps for _, eps in answers), "mean_hours": mean,
    }
    write_atomic(record_path, (json.dumps(record, indent=2) + "\n").encode())
    if record["status"] != "completed":
        raise RuntimeError(f"only {len(answers)} of the {cfg.min_pods} pods needed answered")
    return record


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured rounds and write the run record into the aggregator home."""
    from covey.aggregator._deploy import AggregatorHome
    from covey.aggregator._evaluation import public_evaluator

    rc = dict(context.run_config)
    home = AggregatorHome(Path(str(rc["home"])))
    cfg = run_config_from(rc)
    run_id = str(rc.get("run-name") or context.run_id)
    if str(rc.get("task", "train")) == "usage-stats":
        usage_statistics(FlowerTransport(grid), cfg, run_id, home.run_record(run_id))
        return
    evaluator = public_evaluator(cfg.eval_examples)
    registry = home.registry()
    if registry.current_id is None:
        initial = evaluator.initial_adapter(cfg.seed)
        first, _ = registry.add(initial, parent=None, round=0, run_id=run_id,
                                metrics=evaluator(initial), epsilon=0.0)
        registry.activate(first.id)

    def progress(stats: dict[str, Any]) -> None:
        home.record_round(stats)
        print(json.dumps({"covey-round": stats}), flush=True)

    run_federated(FlowerTransport(grid), registry, cfg, run_id, evaluator,
                  home.run_record(run_id), on_round=progress)
