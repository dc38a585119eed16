"""The user's privacy budget on this pod: the policy, and the ledger's storage.

:class:`covey.privacy.Ledger` owns every decision (compose, check, write, verify); this
module only keeps its entries in the encrypted store (table ``privacy_ledger``,
append-only by trigger), its signed chain head outside the store (``ledger.head`` in the
pod home, 0600), and signs with the device key, which lives in the key file, not in the
store.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from covey._files import write_atomic
from covey.device.store import _audit
from covey.device.store._store import set_meta
from covey.privacy import BudgetPolicy, Ledger, LedgerEntry, Release

if TYPE_CHECKING:
    import sqlcipher3.dbapi2 as sqlite

    from covey.device._pod import Pod

__all__ = ["DEFAULT_DELTA", "DEFAULT_MAX_EPSILON", "HEAD_FILE", "PodLedgerStorage",
           "budget_policy", "pod_ledger", "set_budget_policy"]

DEFAULT_MAX_EPSILON = 10.0
DEFAULT_DELTA = 1e-5
MAX_EPS_KEY = "privacy.max_epsilon"
DELTA_KEY = "privacy.delta"
HEAD_FILE = "ledger.head"


def budget_policy(pod: Pod) -> BudgetPolicy:
    """The user's budget policy (defaults until the user sets one)."""
    rows = dict(pod.store.query("SELECT key, value FROM meta WHERE key IN (?, ?)",
                                (MAX_EPS_KEY, DELTA_KEY)))
    return BudgetPolicy(float(rows.get(MAX_EPS_KEY, DEFAULT_MAX_EPSILON)),
                        float(rows.get(DELTA_KEY, DEFAULT_DELTA)))


def set_budget_policy(pod: Pod, max_epsilon: float, delta: float | None = None) -> BudgetPolicy:
    """Set the user's maximum epsilon (audited); it applies to every later release.

    The policy is also sealed into the ledger's signed head, so a maximum raised in the
    store with the data key alone shows (unless the ledger already did not verify: a
    change made now must not bless an earlier tampering).
    """
    policy = BudgetPolicy(max_epsilon, budget_policy(pod).delta if delta is None else delta)
    intact = pod_ledger(pod).verify().ok
    with pod.store.transaction() as c:
        for key, value in ((MAX_EPS_KEY, policy.max_epsilon), (DELTA_KEY, policy.delta)):
            set_meta(c, key, repr(value))
        _audit.append(c, "budget_policy", detail={"max_epsilon": policy.max_epsilon,
                                                  "delta": policy.delta})
    if intact:
        pod_ledger(pod).seal()
    return policy


def row_entry(row: Any) -> LedgerEntry:
    """A stored ledger row (body, prev_hash, hash, signature) as an entry."""
    body, prev, digest, signature = row
    return LedgerEntry.from_dict({**json.loads(body), "prev_hash": prev, "hash": digest,
                                  "signature": bytes(signature).hex()})


class PodLedgerStorage:
    """:class:`covey.privacy.LedgerStorage` over a pod's store and home."""

    def __init__(self, pod: Pod) -> None:
        self.pod = pod
        self.device_id = pod.identity.device_id

    @contextmanager
    def transaction(self) -> Iterator[sqlite.Connection]:
        with self.pod.store.transaction() as c:
            yield c

    def entries(self) -> list[LedgerEntry]:
        rows = self.pod.store.query(
            "SELECT body, prev_hash, hash, signature FROM (SELECT * FROM privacy_ledger"
            " UNION ALL SELECT * FROM ledger_forks) ORDER BY device_id, seq, hash")
        return [row_entry(row) for row in rows]

    def append(self, entry: LedgerEntry) -> None:
        self.pod.store.conn.execute(
            "INSERT INTO privacy_ledger (device_id, seq, created_at, body, prev_hash, hash,"
            " signature) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (entry.device_id, entry.seq, entry.created_at, entry.body().decode(),
             entry.prev_hash, entry.hash, entry.signature))

    def read_head(self) -> dict[str, Any] | None:
        path = self.pod.home / HEAD_FILE
        if not path.exists():
            return None
        try:
            head: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return head

    def write_head(self, head: dict[str, Any]) -> None:
        write_atomic(self.pod.home / HEAD_FILE, json.dumps(head).encode())

    def sign(self, data: bytes) -> bytes:
        return self.pod.identity.sign(data)

    def public_key(self, device_id: str) -> bytes | None:
        if device_id == self.device_id:
            return self.pod.identity.public_key  # derived from the key file's private key
        rows = self.pod.store.query("SELECT public_key FROM ledger_keys WHERE device_id = ?",
                                    (device_id,))
        return bytes(rows[0][0]) if rows else None


def pod_ledger(pod: Pod) -> Ledger:
    """The user's ledger on this pod, with rows from before signed entries adopted."""
    ledger = Ledger(PodLedgerStorage(pod), budget_policy(pod))
    _adopt_v6_rows(pod, ledger)
    return ledger


def _adopt_v6_rows(pod: Pod, ledger: Ledger) -> None:
    """Sign the rows an older covey wrote into this device's chain, re-accounted as the
    mechanism deserves (a local release at its replace-one sensitivity 2C), then empty
    the old table, in one transaction."""
    rows = pod.store.query("SELECT run_id, round, mode, epsilon, delta, noise_multiplier,"
                           " clip_norm, sample_rate, rounds, model_version, created_at"
                           " FROM ledger_v6 ORDER BY id")
    if not rows:
        return
    storage = ledger.storage
    with pod.store.transaction() as c:
        own = [e for e in storage.entries() if e.device_id == storage.device_id]
        last = own[-1] if own else None
        prev, seq = (last.hash, last.seq) if last else ("0" * 64, 0)
        for r in rows:
            local = r["mode"] == "local"
            # Usage histograms had no model version and clip norm sqrt 2 (their
            # sensitivity); anything else local is charged at the stricter 2C.
            histogram = (local and r["model_version"] is None and r["clip_norm"] is not None
                         and math.isclose(float(r["clip_norm"]), math.sqrt(2)))
            release = Release(
                kind="usage_histogram" if histogram else "federated_update",
                run_id=r["run_id"], round=int(r["round"]), mode=r["mode"],
                noise_multiplier=float(r["noise_multiplier"] or 0.0),
                clip_norm=float(r["clip_norm"] if r["clip_norm"] is not None else math.inf),
                sensitivity=2.0 if local and not histogram else 1.0,
                sample_rate=float(r["sample_rate"] or 1.0), planned_rounds=int(r["rounds"]),
                rounds=int(r["rounds"]), run_delta=float(r["delta"]),
                model_version=str(r["model_version"] or ""))
            seq += 1
            entry = LedgerEntry(storage.device_id, seq, str(r["created_at"]), release,
                                float(r["epsilon"]), prev)
            digest = entry.digest()
            entry = LedgerEntry(entry.device_id, seq, entry.created_at, release,
                                entry.epsilon, prev, digest, storage.sign(bytes.fromhex(digest)))
            storage.append(entry)
            prev = digest
        c.execute("DELETE FROM ledger_v6")
        _audit.append(c, "ledger_adopted", detail={"rows": len(rows)})
    ledger._write_head(entry)
