"""A joined pod's round agent, looked at as a local attacker would: where the data key
goes when `covey pod join` starts it, what the SuperNode is given, and what its socket
gives (a DP answer from the pod it alone can open, never the key)."""

from __future__ import annotations

import base64
import os
import stat
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.supercore.task_identity import TaskIdentity

from covey._processes import alive, descendants
from covey.aggregator._registry import Registry
from covey.device import Pod
from covey.device.context._context import enable, record_usage
from covey.device.federation import _join
from covey.device.federation._participation import spent
from covey.device.federation._round_agent import MAX_FRAME, ask
from covey.device.store import _audit
from covey.protocols._trusted_app import trusted_entities
from tests.conftest import FAST_CONFIG, PASSPHRASE
from tests.device.test_join import _certs, _serve


@pytest.fixture
def aggregator(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    folder = tmp_path / "aggregator"
    folder.mkdir()
    ca, cert, key = _certs(folder, expired=False)
    for address in _serve(cert, key):
        yield address, ca


_FAKE_SUPERNODE = """#!{python}
import os, re, socket, sys
from pathlib import Path
from covey.device.federation._round_agent import ask, recv_frame, send_frame
env = "\\n".join(f"{{k}}={{v}}" for k, v in os.environ.items())
Path("{seen}.env").write_text(env)
Path("{seen}.args").write_text(" ".join(sys.argv[1:]))
target = Path(re.search(r'round-socket="([^"]+)"', " ".join(sys.argv)).group(1))
relay = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
relay.bind("{relay}")
relay.listen()
while True:
    conn, _ = relay.accept()
    with conn:
        try:
            send_frame(conn, ask(target, recv_frame(conn)))
        except Exception:
            pass
"""


def _ask(socket: Path, kind: str, records: RecordDict) -> Message:
    raw = ask(socket, message_to_proto(
        Message(records, dst_node_id=1, message_type=kind)).SerializeToString())
    proto = ProtoMessage()
    proto.ParseFromString(raw)
    return message_from_proto(proto)


def test_the_key_goes_to_the_round_agent_alone(pod: Pod, home: Path, tmp_path: Path,
                                                aggregator: tuple[str, Path],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    address, ca = aggregator
    enable(pod, "routine")
    for hour in (8, 9, 9, 20):
        record_usage(pod, datetime(2026, 1, 5, hour, tzinfo=UTC))
    # A stand-in for flower-supernode records what it is given, then relays frames from
    # `relay` to the round socket, as the ClientApp it would run does.
    seen, relay = tmp_path / "supernode-saw", tmp_path / "relay.sock"
    fake = tmp_path / "flower-supernode"
    fake.write_text(_FAKE_SUPERNODE.format(python=sys.executable, seen=seen, relay=relay))
    fake.chmod(0o755)
    monkeypatch.setattr(_join, "flower_bin", lambda name: str(fake))
    monkeypatch.setenv("COVEY_PASSPHRASE", PASSPHRASE)  # as a non-interactive join has it
    registry = Registry(tmp_path / "registry")
    info = _join.join(home, PASSPHRASE, address, ca, registry.public_key_path, wait=1.0)
    agent, socket = int(info["pid"]), Path(info["socket"])
    try:
        assert stat.S_IMODE(socket.stat().st_mode) == 0o600
        assert stat.S_IMODE(socket.parent.stat().st_mode) == 0o700
        spellings = [PASSPHRASE.encode()]
        for key in Pod.keys(home, PASSPHRASE):  # the data key and the device key
            spellings += [key, key.hex().encode(), base64.b64encode(key)]
        supernode_env = seen.with_suffix(".env").read_bytes()
        assert b"COVEY_PASSPHRASE" not in supernode_env
        assert not any(s in supernode_env for s in spellings)
        try:  # readable only by root: the agent is not dumpable
            agent_env = Path(f"/proc/{agent}/environ").read_bytes()
        except PermissionError:
            agent_env = b""
        assert not any(s in agent_env for s in spellings)
        assert not any(s in Path(f"/proc/{agent}/cmdline").read_bytes() for s in spellings)
        # The SuperNode trusts the pinned aggregator key, and that alone.
        args = seen.with_suffix(".args").read_text().split()
        entities = Path(args[args.index("--trusted-entities") + 1])
        assert yaml.safe_load(entities.read_text()) == yaml.safe_load(
            trusted_entities(registry.public_key))
        assert f'round-socket="{socket}"' in args

        # The socket answers a round's questions from the pod it alone opens, under DP,
        # and only to the SuperNode's processes.
        monkeypatch.setattr(TaskIdentity, "_run_id", 1)
        monkeypatch.setattr(TaskIdentity, "_node_id", 0)
        monkeypatch.setattr(TaskIdentity, "_task_id", 1)
        before = spent(pod)
        for _ in range(100):
            if relay.exists():
                break
            time.sleep(0.1)
        with pytest.raises(OSError):  # this process is the user's, but not the SuperNode's
            _ask(socket, "query", RecordDict({"stats": ConfigRecord({
                "kind": "usage_hours", "run-id": "stats-0", "noise-multiplier": 8.0})}))
        assert spent(pod) == before
        reply = _ask(relay, "query", RecordDict({"stats": ConfigRecord({
            "kind": "usage_hours", "run-id": "stats-1", "noise-multiplier": 8.0})}))
        assert not reply.has_error(), reply.error
        assert len(reply.content.array_records["hours"].to_numpy_ndarrays()[0]) == 24
        assert spent(pod) > before  # charged to the user's ledger
        malformed = _ask(relay, "train", RecordDict({"round": ConfigRecord({"x": 1})}))
        assert malformed.has_error() and "malformed" in malformed.error.reason
        # A frame over the limit is dropped, and the agent keeps serving.
        with pytest.raises(ValueError, match="over the"):
            ask(relay, b"\0" * (MAX_FRAME + 1))
        assert _ask(relay, "evaluate", RecordDict()).has_error()  # covey asks no such thing
        # One worker answered them all, as the agent's child.
        workers = [p for p in descendants(agent)
                   if b"--worker" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(workers) == 1
    finally:
        assert _join.leave(home)
    assert not alive(agent) and not socket.exists()
    assert not any(alive(p) for p in workers)
    assert os.environ["COVEY_PASSPHRASE"] == PASSPHRASE  # the caller's own is untouched


def test_a_refusal_leaves_the_pod_audited(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # A refusal goes to the aggregator too: what, to whom and how many bytes are in the
    # audit log, as for every egress (and in the pod report's egress table).
    from covey.device._pod_audit import pod_audit
    from covey.device.federation._clientapp import answer
    from covey.privacy import pod_report

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # what a SuperNode's message carries
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    home = tmp_path / "pod"
    Pod.create(home, PASSPHRASE, config=FAST_CONFIG).close()
    keys = Pod.keys(home, PASSPHRASE)
    msg = Message(RecordDict({"stats": ConfigRecord({"kind": "usage_hours", "run-id": "s",
                                                     "noise-multiplier": 4.0})}),
                  dst_node_id=0, message_type="query")
    reply = answer(msg, lambda: Pod.open_with_keys(home, *keys), b"\0" * 32, "agg:9443")
    assert reply.has_error() and "routine" in reply.error.reason
    with Pod.open(home, PASSPHRASE) as pod:
        refusals = [e for e in _audit.entries(pod.store.conn) if e.kind == "round_refused"]
        assert [(e.peer, e.detail["code"]) for e in refusals] == [("agg:9443", "no_consent")]
        assert refusals[0].bytes == len(reply.error.reason)
        egress = pod_report(pod_audit(pod))["summary"]["egress_bytes"]
        assert egress["aggregator"] == refusals[0].bytes
