"""The pod's side of sync: the replicated state in the encrypted store, kept in step with
the pod's own tables; the user key; who may connect; pairing; revocation.

What is shared, and where it lives on the pod:

- ``profile``: the user's name, time zone and language (:mod:`covey.device.memory._profile`);
- ``preferences``: the current edges of the preference graph, keyed like
  :attr:`Fact.key` ("sister", "taste:coffee", "allergic_to:nuts");
- ``consents``: the consents table, by scope;
- ``budget_policy``: the user's maximum epsilon and delta (key ``policy``); a received
  one is validated, audited when it changes the budget, and a raise is taken only from a
  current device (else refused, and this pod's own policy written again);
- ``devices``, ``revocations`` and ``kept_entries``: only in the replicated state,
  grow-only: certificates and revocations signed by user keys, and the lists of a revoked
  device's entries its revocation keeps, from which :class:`UserTrust` derives the key
  chain, the current devices, the revoked ones and what of theirs still counts;
- ``memories``: only while the user grants the ``sync_memories`` consent, keyed by a
  hash of kind and text. Forgetting a memory that was shared writes a tombstone at
  once, whatever the consent, so a forget reaches every pod.

Every entry is signed by the device that wrote it (this pod's own with its device key).
Local edits are found by comparing the pod's tables with the replicated state each time
a session begins (:meth:`PodState.begin`): no other code path needs to know about sync.
Entries received from a peer are checked (see :mod:`covey.protocols._crdt`) and applied
to the pod's tables in the same transaction that stores them; entries a revocation that
just arrived did not keep are dropped and undone there too (:meth:`PodState.merged`).

The user key is held in ``user_identity`` with the user id, which never changes; a
revocation replaces the key (:meth:`PodState.revoke`), and the new one arrives from
another current device (:meth:`PodState.receive_key`). Pairing never replaces a key.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import sqlcipher3.dbapi2 as sqlite

from covey._time import utc_timestamp
from covey.device.assistant._facts import Fact
from covey.device.assistant._feedback import write_consent
from covey.device.federation._participation import (
    _DELTA_KEY,
    _MAX_EPS_KEY,
    DEFAULT_DELTA,
    DEFAULT_MAX_EPSILON,
    BudgetPolicy,
)
from covey.device.memory._graph import PreferenceGraph
from covey.device.memory._profile import PROFILE_FIELDS, validate
from covey.device.store import _audit
from covey.device.store._store import set_meta
from covey.device.sync._entries import memory_key, save_entries, save_vector
from covey.errors import InvalidInputError, SyncError
from covey.protocols import (
    HLC,
    KEPT,
    DeviceCertificate,
    Entry,
    MergeResult,
    Refused,
    Replica,
    Revocation,
    UserKey,
    UserTrust,
    b64,
    device_id_of,
    grow_only,
    lww,
    revoke,
    unb64,
    user_schema,
    user_trust,
)

if TYPE_CHECKING:
    from covey.device._pod import Pod

__all__ = ["SYNC_MEMORIES", "Device", "PodState", "memory_key"]

SYNC_MEMORIES = "sync_memories"  # the consent scope under which memories are shared
_NOT_FUNCTIONAL = {"likes", "dislikes", "allergic_to"}
_TASTES = {"likes", "dislikes"}



def preference_key(relation: str, value: str) -> str:
    """The replicated key of a preference edge (what a newer fact replaces)."""
    if relation not in _NOT_FUNCTIONAL:
        return relation
    return f"{'taste' if relation in _TASTES else relation}:{value.lower()}"


def _user_trust(replica: Replica) -> UserTrust:
    trust = replica.trust()
    if not isinstance(trust, UserTrust):  # PodState builds every replica with user_trust
        raise TypeError("the replica's trust is not a user's")
    return trust


def _held_policy(conn: sqlite.Connection) -> BudgetPolicy:
    """The budget policy in the pod's tables (inside the caller's transaction)."""
    meta = dict(conn.execute("SELECT key, value FROM meta WHERE key IN (?, ?)",
                             (_MAX_EPS_KEY, _DELTA_KEY)).fetchall())
    return BudgetPolicy(float(meta.get(_MAX_EPS_KEY, DEFAULT_MAX_EPSILON)),
                        float(meta.get(_DELTA_KEY, DEFAULT_DELTA)))


@dataclass(frozen=True)
class Device:
    """A device of the user, as its certificate says, and whether it was revoked.

    ``current``: certified by the current user key and not revoked (it may sync).
    """

    device_id: str
    name: str
    public_key: bytes
    issued_at: str
    revoked: Revocation | None = None
    current: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "name": self.name,
                "public_key": base64.b64encode(self.public_key).decode(),
                "issued_at": self.issued_at, "current": self.current,
                "revoked_at": self.revoked.revoked_at if self.revoked else None,
                "revoked_reason": self.revoked.reason if self.revoked else None}


def _policy(entry: Entry | None) -> BudgetPolicy:
    """The budget policy an entry holds (the defaults for none, or a tombstone)."""
    if entry is None or entry.deleted:
        return BudgetPolicy()
    return BudgetPolicy.from_dict(entry.value)


def _raises(new: BudgetPolicy, old: BudgetPolicy) -> bool:
    """Whether ``new`` lets rounds spend more privacy than ``old``."""
    return new.max_epsilon > old.max_epsilon or new.delta > old.delta


def _verify_budget(entry: Entry, trust: Any, current: Entry | None) -> None:
    """A synced budget policy must be a valid BudgetPolicy; one that raises the budget
    must come from a current device of the user (certified by the current user key, not
    revoked). Lowering it is always safe and needs no more than any entry does."""
    if entry.key != "policy":
        raise ValueError("the budget policy is kept under the key 'policy'")
    new = _policy(entry)
    try:
        old = _policy(current)
    except ValueError:
        old = BudgetPolicy()
    if _raises(new, old) and entry.origin not in trust.current:
        raise Refused("budget_raise", "a budget raise from a device that is not current")


def _verify_profile(entry: Entry, trust: Any, current: Entry | None) -> None:
    if entry.key not in PROFILE_FIELDS:
        raise ValueError(f"unknown profile field {entry.key!r}")
    if not entry.deleted:
        if not isinstance(entry.value, str):
            raise ValueError("a profile value is text")
        validate(entry.key, entry.value)


def _verify_ledger_entry(entry: Entry, trust: Any, current: Entry | None) -> None:
    """A ledger entry is a well-formed, chained entry of the device that wrote it into the
    replica, signed by that device's key (as the entry itself was): a pod can publish its
    own spend, never another device's, and nobody can change one."""
    from covey.privacy import LedgerEntry, verify_signature

    row = LedgerEntry.from_dict(entry.value)
    if row.device_id != entry.origin:
        raise Refused("foreign_ledger", "a ledger entry published by another device")
    key = trust.device_key(row.device_id)
    if key is None or row.digest() != row.hash or \
            not verify_signature(key, row.signature, bytes.fromhex(row.hash)):
        raise ValueError("a ledger entry that its device did not sign")


#: What a user's pods share, with the pod's own checks of the profile and budget policy,
#: and every pod's privacy ledger (the user's budget is composed over all of them).
POD_SCHEMA = user_schema(lww("budget_policy", verify=_verify_budget),
                         lww("profile", verify=_verify_profile),
                         grow_only("ledger", verify=_verify_ledger_entry))
#: The collections kept first-come, never replaced.
_GROW_ONLY = frozenset(c.name for c in POD_SCHEMA if c.grow_only)


def _save(conn: sqlite.Connection, entries: list[Entry]) -> None:
    save_entries(conn, entries, _GROW_ONLY)


class PodState:
    """The pod's replicated state, as the sync sessions see it (see the module doc)."""

    def __init__(self, pod: Pod) -> None:
        self.pod = pod
        self.node = pod.identity.device_id
        self.schema = POD_SCHEMA
        self._replica: Replica | None = None
        self._seen_version = -1
        self._published_version = -1
        self._erased = False

    # -- loading and persisting ---------------------------------------------------------

    def _data_version(self) -> int:
        return int(self.pod.store.query("PRAGMA data_version")[0][0])

    def refresh(self) -> bool:
        """Publish local edits if another connection wrote the store since the last look
        (cheap when nothing changed: one pragma). Whether it looked."""
        version = self._data_version()
        if version == self._published_version:
            return False
        self.publish()
        self._published_version = version
        return True

    def replica(self) -> Replica:
        """The replica, reloaded when another process (a CLI command) wrote the store."""
        version = self._data_version()
        if self._replica is None or version != self._seen_version:
            self._replica = self._load()
            self._seen_version = version
        return self._replica

    def _load(self) -> Replica:
        rows = self.pod.store.query("SELECT user_id FROM user_identity")
        replica = Replica(self.node, self.schema, signer=self.pod.identity.private_key,
                          trust=user_trust(str(rows[0][0]) if rows else None))
        own: list[HLC] = []
        for r in self.pod.store.query("SELECT collection, key, value, stamp, deleted,"
                                      " signature FROM sync_entries"):
            stamp = HLC.decode(r["stamp"])
            value = None if r["deleted"] else json.loads(r["value"])
            replica.entries[(r["collection"], r["key"])] = Entry(
                r["collection"], r["key"], value, stamp, bool(r["deleted"]), r["signature"])
            if stamp.node == self.node:
                own.append(stamp)
        replica.vector = {r["node"]: HLC.decode(r["stamp"])
                          for r in self.pod.store.query("SELECT node, stamp FROM sync_vector")}
        if self.node in replica.vector:
            own.append(replica.vector[self.node])
        if own:  # never reissue a timestamp this pod already used
            last = max(own)
            replica.clock.wall, replica.clock.counter = last.wall, last.counter
        return replica

    def trust(self) -> UserTrust:
        """Who may write, as this pod's replica says."""
        return _user_trust(self.replica())

    @contextmanager
    def _writing(self) -> Iterator[tuple[sqlite.Connection, Replica]]:
        """A store transaction and the replica; on failure the replica is reloaded."""
        replica = self.replica()
        try:
            with self.pod.store.transaction() as conn:
                yield conn, replica
        except BaseException:
            self._replica = None
            raise

    def edit(self, change: Callable[[Replica], list[Entry]]) -> list[Entry]:
        """Make local edits to the replicated state and store them."""
        with self._writing() as (conn, replica):
            entries = change(replica)
            _save(conn, entries)
            save_vector(conn, replica.vector)
        return entries

    # -- the SyncState protocol -----------------------------------------------------------

    def begin(self) -> Replica:
        """Publish the pod's local edits into the replica and hand it out."""
        self.heal()
        self.publish()
        return self.replica()

    def held_key(self) -> str:
        """The public half of the user key this pod holds (base64), or ""."""
        key = self.user_key()
        return b64(key.public_key) if key else ""

    def key_for(self, peer: str, holds: str) -> bytes | None:
        """The current user key, for a current device of the user that lacks it (the
        rotated key reaches the remaining devices, and only them, this way)."""
        key, trust = self.user_key(), self.trust()
        if key is None or trust.head != key.public_key or peer == self.node \
                or peer not in trust.current or holds == b64(key.public_key):
            return None
        private = key.private_bytes()
        # An egress to a paired device: the new user key, over the peer's channel.
        self.pod.audit("sync.user_key", peer=peer, nbytes=len(private),
                       detail={"what": "the current user key"})
        return private

    def receive_key(self, private: bytes, peer: str) -> bool:
        """Take the current user key from device ``peer``: only a successor of the key this
        pod holds (the same user, the head of the chain it knows), never a first one."""
        held, trust = self.user_key(), self.trust()
        try:
            key = UserKey.from_bytes(private, held.user_id if held else "")
        except ValueError:
            return False
        if held is None or key.public_key != trust.head or key.public_key == held.public_key \
                or peer not in trust.current or held.public_key not in trust.depth:
            return False
        with self.pod.store.transaction() as conn:
            conn.execute("UPDATE user_identity SET private_key = ? WHERE id = 1",
                         (key.private_bytes(),))
            _audit.append(conn, "sync.user", peer=peer, detail={"user_id": held.user_id,
                                                                "rotated": True})
        return True

    def heal(self) -> list[Entry]:
        """Finish what two pods revoking at once left undone (only with the current key):
        certify again the devices this pod certified that the winning rotation did not,
        and revoke again a device this pod revoked that the winning rotation kept."""
        key, trust = self.user_key(), self.trust()
        if key is None or trust.head != key.public_key or trust.conflict:
            return []
        head = trust.head
        for device, held in trust.revocations.items():
            mine = any(h.origin == self.node for h in held)
            kept = any(h.signer == head for h in trust.certificates.get(device, []))
            if mine and kept and device != self.node:
                reason = held[0].statement.reason
                self._rotate(key, device, reason)
                return self.heal()
        orphans = [d for d, held in trust.certificates.items()
                   if d not in trust.current and d not in trust.revocations
                   and any(h.origin == self.node for h in held)]
        certificates = [key.certify(c.device_key, c.name).to_dict()
                        for c in map(trust.latest, orphans)]
        if not certificates:
            return []
        return self.edit(lambda r: [r.add("devices", c) for c in certificates])

    def merged(self, replica: Replica, result: MergeResult, peer: str) -> None:
        """Store what a peer's delta changed, and apply it to the pod's tables (and undo
        there what it dropped); the ledger's signed head then covers the entries and the
        policy received (unless it did not verify before: received state never blesses
        an earlier tampering)."""
        from covey.device.federation._budget import pod_ledger

        changed = result.changed
        sealing = (any(e.collection in ("ledger", "budget_policy") for e in changed)
                   or bool(result.dropped)) and pod_ledger(self.pod).verify().ok
        with self._writing() as (conn, _):
            _save(conn, changed)
            if result.dropped:
                self._drop(conn, result.dropped, peer)
            save_vector(conn, replica.vector)
            remote = [e for e in changed if e.stamp.node != self.node]
            # Consents first: whether memories are applied depends on them.
            for entry in sorted(remote, key=lambda e: e.collection != "consents"):
                self._apply(conn, entry)
            # Ledger entries whatever their origin: this pod's own come back from the
            # user's other pods after its store was rolled back.
            self._apply_ledger(conn, [e for e in changed if e.collection == "ledger"])
            if result.refused.get("budget_raise"):
                self._reassert_budget(conn, peer, result.refused["budget_raise"])
        if sealing:
            pod_ledger(self.pod).seal()
        if self._erased:  # forgotten memories leave the file pages too, as with a local forget
            self._erased = False
            self.pod.store.checkpoint()

    # -- the pod's tables as replicated entries -----------------------------------------

    def local_view(self, conn: sqlite.Connection) -> dict[tuple[str, str], Any]:
        """The shared part of the pod's tables, as (collection, key) -> value."""
        view: dict[tuple[str, str], Any] = {}
        for fact in PreferenceGraph(self.pod.store).current():
            view[("preferences", preference_key(fact.relation, fact.value))] = {
                "relation": fact.relation, "value": fact.value}
        for scope, granted in conn.execute("SELECT scope, granted FROM consents"):
            view[("consents", scope)] = bool(granted)
        meta = dict(conn.execute("SELECT key, value FROM meta WHERE key IN (?, ?)",
                                 (_MAX_EPS_KEY, _DELTA_KEY)).fetchall())
        if _MAX_EPS_KEY in meta:
            view[("budget_policy", "policy")] = {
                "max_epsilon": float(meta[_MAX_EPS_KEY]),
                "delta": float(meta.get(_DELTA_KEY, 1e-5))}
        for key, value in conn.execute("SELECT key, value FROM meta WHERE key LIKE 'profile.%'"):
            view[("profile", key.removeprefix("profile."))] = value
        if view.get(("consents", SYNC_MEMORIES)):
            for kind, text in conn.execute("SELECT kind, text FROM memories"):
                view[("memories", memory_key(kind, text))] = {"kind": kind, "text": text}
        return view

    def publish(self) -> list[Entry]:
        """Write the pod's local edits into the replicated state (as this pod's entries)."""
        with self._writing() as (conn, replica):
            view = self.local_view(conn)
            written: list[Entry] = []
            for (collection, key), value in view.items():
                if replica.get(collection, key) != value:
                    written.append(replica.set(collection, key, value))
            shared = {json.dumps(v, sort_keys=True)
                      for v in replica.items("ledger").values()}
            for row in self._own_ledger(conn):  # grow-only: added, never replaced
                if json.dumps(row, sort_keys=True) not in shared:
                    written.append(replica.add("ledger", row))
            for (collection, name), entry in list(replica.entries.items()):
                # Memories are never deleted by omission: only an explicit forget deletes.
                if (not entry.deleted and collection in ("profile", "preferences", "consents",
                                                         "budget_policy")
                        and (collection, name) not in view):
                    written.append(replica.delete(collection, name))
            if written:
                _save(conn, written)
                save_vector(conn, replica.vector)
        return written

    def _own_ledger(self, conn: sqlite.Connection) -> list[dict[str, Any]]:
        """This device's ledger entries, as they are shared."""
        from covey.device.federation._budget import row_entry

        return [row_entry(row).to_dict() for row in conn.execute(
            "SELECT body, prev_hash, hash, signature FROM privacy_ledger WHERE device_id = ?"
            " ORDER BY seq", (self.node,))]

    def _apply_ledger(self, conn: sqlite.Connection, entries: list[Entry]) -> None:
        """Keep the user's other pods' ledger entries (checked on merge), and the keys
        they verify against, so this pod's budget counts every pod's spend."""
        from covey.privacy import LedgerEntry

        if not entries:
            return
        for device in self.devices():  # revoked ones too: their spend still counts
            conn.execute("INSERT OR IGNORE INTO ledger_keys (device_id, public_key)"
                         " VALUES (?, ?)", (device.device_id, device.public_key))
        for entry in entries:
            row = LedgerEntry.from_dict(entry.value)
            held = conn.execute("SELECT hash FROM privacy_ledger WHERE device_id = ? AND"
                                " seq = ?", (row.device_id, row.seq)).fetchone()
            if held is not None and held[0] == row.hash:
                continue
            # A second entry for a number already held is a fork (a store put back and
            # spent again): kept, so that both branches count and the fork shows.
            table = "privacy_ledger" if held is None else "ledger_forks"
            conn.execute(
                f"INSERT OR IGNORE INTO {table} (device_id, seq, created_at, body,"  # noqa: S608
                " prev_hash, hash, signature) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (row.device_id, row.seq, row.created_at, row.body().decode(), row.prev_hash,
                 row.hash, row.signature))

    def _apply(self, conn: sqlite.Connection, entry: Entry) -> None:
        c, value = entry.collection, entry.value
        if c == "preferences":
            self._apply_preference(conn, entry)
        elif c == "consents":
            if entry.deleted:
                conn.execute("DELETE FROM consents WHERE scope = ?", (entry.key,))
            else:
                write_consent(conn, entry.key, bool(value))
        elif c == "budget_policy" and entry.key == "policy":
            before = _held_policy(conn)
            if entry.deleted:
                conn.execute("DELETE FROM meta WHERE key IN (?, ?)", (_MAX_EPS_KEY, _DELTA_KEY))
            else:
                policy = BudgetPolicy.from_dict(value)  # checked on merge, as the ledger reads it
                for key, number in ((_MAX_EPS_KEY, policy.max_epsilon),
                                    (_DELTA_KEY, policy.delta)):
                    set_meta(conn, key, repr(float(number)))
            after = _held_policy(conn)
            if after != before:  # what the ledger checks rounds against changed: say so
                _audit.append(conn, "budget_policy", peer=entry.origin, detail={
                    "max_epsilon": after.max_epsilon, "delta": after.delta, "by": "sync",
                    "previous_max_epsilon": before.max_epsilon,
                    "previous_delta": before.delta})
        elif c == "memories":
            self._apply_memory(conn, entry)
        elif c == "profile" and entry.key in PROFILE_FIELDS:
            if entry.deleted:
                conn.execute("DELETE FROM meta WHERE key = ?", ("profile." + entry.key,))
            else:  # checked on merge (a bad value is refused there, and counted)
                set_meta(conn, "profile." + entry.key, validate(entry.key, str(value)))

    def _drop(self, conn: sqlite.Connection, dropped: list[Entry], peer: str) -> None:
        """A revocation arrived that voids entries this pod took from the revoked device
        before it knew (written after the revoking pod's last look at that device, or never
        seen by it): forget them and undo what they did here, and take everything again
        from the peers (the replica forgot its version vector), since what they overwrote
        may still count. A key they set goes back to unset until an entry that counts
        comes again; a budget policy they changed goes back to the lower of the value held
        and the value before it (never a raise); their ledger entries stay in the ledger,
        which is append-only and only counts more spend for them."""
        conn.execute("DELETE FROM sync_vector WHERE node != ?", (self.node,))
        for entry in dropped:
            conn.execute("DELETE FROM sync_entries WHERE collection = ? AND key = ? AND"
                         " stamp = ? AND signature = ?", (entry.collection, entry.key,
                                                          entry.stamp.encode(), entry.signature))
            c = entry.collection
            if c == "budget_policy" and entry.key == "policy":
                self._undo_budget(conn, entry)
            elif entry.deleted:  # a value it erased comes again from a peer that holds one
                continue
            elif c in ("preferences", "profile", "consents"):
                self._apply(conn, replace(entry, value=None, deleted=True))
            elif c == "memories" and isinstance(entry.value, dict) and memory_key(
                    str(entry.value.get("kind")), str(entry.value.get("text"))) == entry.key:
                # Only the copy sync made: the user's own stays (and is shared again).
                for (mid,) in conn.execute(
                        "SELECT id FROM memories WHERE json_extract(provenance, '$.source')"
                        " = 'sync' AND kind = ? AND text = ?",
                        (entry.value["kind"], entry.value["text"])).fetchall():
                    self.pod.memories.delete(conn, mid)
        by_collection: dict[str, int] = {}
        for entry in dropped:
            by_collection[entry.collection] = by_collection.get(entry.collection, 0) + 1
        _audit.append(conn, "sync.dropped", peer=peer, detail={
            "entries": len(dropped), "collections": by_collection,
            "writers": sorted({e.origin for e in dropped})})

    def _undo_budget(self, conn: sqlite.Connection, entry: Entry) -> None:
        """A revoked device's budget policy was dropped: keep the lower of the policy held
        and the one before it (from the audit record of the change it made), and write it
        as this pod's own, so that no pod keeps the dropped one."""
        held = before = _held_policy(conn)
        try:
            dropped = _policy(entry)
        except ValueError:
            dropped = held
        for (detail,) in conn.execute("SELECT detail FROM audit_log WHERE kind ="
                                      " 'budget_policy' AND peer = ? ORDER BY seq DESC LIMIT 1",
                                      (entry.origin,)):
            change = json.loads(detail)
            if change.get("max_epsilon") == dropped.max_epsilon and \
                    change.get("delta") == dropped.delta and change.get("by") == "sync":
                before = BudgetPolicy(float(change["previous_max_epsilon"]),
                                      float(change["previous_delta"]))
        policy = BudgetPolicy(min(held.max_epsilon, before.max_epsilon),
                              min(held.delta, before.delta))
        for key, number in ((_MAX_EPS_KEY, policy.max_epsilon), (_DELTA_KEY, policy.delta)):
            set_meta(conn, key, repr(float(number)))
        replica = self.replica()
        written = replica.set("budget_policy", "policy", {"max_epsilon": policy.max_epsilon,
                                                          "delta": policy.delta})
        _save(conn, [written])
        if policy != held:
            _audit.append(conn, "budget_policy", peer=entry.origin, detail={
                "max_epsilon": policy.max_epsilon, "delta": policy.delta, "by": "revocation",
                "previous_max_epsilon": held.max_epsilon, "previous_delta": held.delta})

    def _reassert_budget(self, conn: sqlite.Connection, peer: str, refused: int) -> None:
        """A raise of the budget was refused: write this pod's own policy again, newer than
        the raise, so the lower policy wins on every pod that took the raise."""
        replica = self.replica()
        policy = _held_policy(conn)
        for key, number in ((_MAX_EPS_KEY, policy.max_epsilon), (_DELTA_KEY, policy.delta)):
            set_meta(conn, key, repr(float(number)))
        entry = replica.set("budget_policy", "policy", {"max_epsilon": policy.max_epsilon,
                                                        "delta": policy.delta})
        _save(conn, [entry])
        save_vector(conn, replica.vector)
        _audit.append(conn, "sync.refused", peer=peer, detail={
            "what": "budget_raise", "entries": refused, "kept_max_epsilon": policy.max_epsilon,
            "kept_delta": policy.delta})

    def _apply_preference(self, conn: sqlite.Connection, entry: Entry) -> None:
        now = utc_timestamp()
        for current in PreferenceGraph(self.pod.store).current():
            if preference_key(current.relation, current.value) == entry.key:
                conn.execute("UPDATE graph_edges SET superseded_at = ? WHERE id = ?",
                             (now, current.edge_id))
        if not entry.deleted:
            relation, value = str(entry.value["relation"]), str(entry.value["value"])
            fact = Fact(relation, value, "preference", relation not in _NOT_FUNCTIONAL, "")
            PreferenceGraph(self.pod.store).assert_fact(conn, fact, {"source": "sync"})

    def _apply_memory(self, conn: sqlite.Connection, entry: Entry) -> None:
        local = [(mid, kind, text) for mid, kind, text in
                 conn.execute("SELECT id, kind, text FROM memories")
                 if memory_key(kind, text) == entry.key]
        if entry.deleted:
            for mid, _, _ in local:
                self.pod.memories.delete(conn, mid)
            if local:
                self._erased = True
                _audit.append(conn, "erasure", detail={"table": "memories", "rows": len(local),
                                                       "by": "sync"})
            return
        granted = conn.execute("SELECT granted FROM consents WHERE scope = ?",
                               (SYNC_MEMORIES,)).fetchone()
        if not local and granted and granted[0]:
            self.pod.memories.insert(conn, str(entry.value["text"]), str(entry.value["kind"]),
                                     {"source": "sync"})

    # -- identity ----------------------------------------------------------------------

    def user_key(self) -> UserKey | None:
        """The user key this pod holds, once it has one (made on first pairing)."""
        rows = self.pod.store.query("SELECT user_id, private_key FROM user_identity")
        return UserKey.from_bytes(rows[0]["private_key"], rows[0]["user_id"]) if rows else None

    def user_since(self) -> str:
        rows = self.pod.store.query("SELECT created_at FROM user_identity")
        return str(rows[0][0]) if rows else ""

    def adopt_user_key(self, private: bytes, user_id: str) -> UserKey:
        """Hold ``private`` as the key of user ``user_id`` (pairing's joining side).

        Raises:
            SyncError: this pod already holds a user key (it never takes another).
        """
        key = UserKey.from_bytes(private, user_id)
        with self.pod.store.transaction() as conn:
            held = conn.execute("SELECT user_id FROM user_identity").fetchone()
            if held is not None:
                raise SyncError(f"this pod already belongs to user {held[0]}; it never takes "
                                "another user key (erase it with `covey pod forget` first)")
            conn.execute("INSERT INTO user_identity (id, user_id, private_key, created_at)"
                         " VALUES (1, ?, ?, ?)", (user_id, private, utc_timestamp()))
            _audit.append(conn, "sync.user", detail={"user_id": user_id})
        self._replica = None  # the trust now has an anchor
        return key

    def ensure_user(self) -> UserKey:
        """The user key, made now (with this device's genesis certificate) if there is none."""
        key = self.user_key()
        if key is not None:
            return key
        key = UserKey.generate_for(self.pod.identity.public_key)
        cert = key.certify(self.pod.identity.public_key, self.pod.name)
        with self._writing() as (conn, replica):
            conn.execute("INSERT INTO user_identity (id, user_id, private_key, created_at)"
                         " VALUES (1, ?, ?, ?)",
                         (key.user_id, key.private_bytes(), utc_timestamp()))
            _audit.append(conn, "sync.user", detail={"user_id": key.user_id, "made": True})
            entry = replica.add("devices", cert.to_dict())
            _save(conn, [entry])
            save_vector(conn, replica.vector)
        self._replica = None  # the trust now has an anchor
        return key

    def holds_current_key(self) -> UserKey:
        """The user key, if it is the current one (the head of the chain).

        Raises:
            SyncError: no user key, or this pod holds a superseded one (it gets the
                current one from another device at its next sync).
        """
        key = self.user_key()
        if key is None:
            raise SyncError("this pod is not paired with any device")
        if self.trust().head != key.public_key:
            raise SyncError("this pod does not hold the current user key yet; let it sync "
                            "with another of your devices first")
        return key

    def certify(self, key: UserKey, public_key: bytes, name: str) -> DeviceCertificate:
        """Certify a device of the user and add it to the replicated device list."""
        cert = key.certify(public_key, name)
        self.edit(lambda r: [r.add("devices", cert.to_dict())])
        return cert

    def devices(self) -> list[Device]:
        """Every device ever validly certified for the user, with its revocation."""
        trust = self.trust()
        found = []
        for device_id in trust.certificates:
            cert = trust.latest(device_id)
            found.append(Device(device_id, cert.name, cert.device_key, cert.issued_at,
                                trust.revocation(device_id), device_id in trust.current))
        return sorted(found, key=lambda d: (d.issued_at, d.device_id))

    def device(self, device_id: str) -> Device | None:
        return next((d for d in self.devices() if d.device_id == device_id), None)

    def pin(self, public_key: bytes) -> str | None:
        """Who may sync with this pod: its user's current devices (never a revoked one)."""
        trust, device_id = self.trust(), device_id_of(public_key)
        if trust.conflict:
            return ("this pod's user key chain forked (two devices revoked each other): it "
                    "trusts no device until it is paired again")
        revocation = trust.revocation(device_id)
        if revocation is not None:
            reason = f" ({revocation.reason})" if revocation.reason else ""
            return f"this device was revoked by its user on {revocation.revoked_at[:10]}{reason}"
        if device_id == self.node or device_id not in trust.current \
                or trust.device_key(device_id) != public_key:
            return "not a paired device"
        return None

    def revoke(self, which: str, reason: str = "") -> Device:
        """Revoke a device of the user (by id, id prefix or name), for good, and replace the
        user key: the other current devices are certified again by the new key, which
        reaches them (and only them) at their next sync. The revocation keeps the
        device's entries this pod holds now; nothing else the device signed counts on
        any pod that hears of it.

        Raises:
            InvalidInputError: no such device, several match, or it is this one.
            SyncError: not paired, or this pod does not hold the current user key.
        """
        if self.user_key() is None:
            raise InvalidInputError("this pod is not paired with any device")
        key = self.holds_current_key()
        matches = [d for d in self.devices()
                   if d.device_id == which or d.name == which
                   or (len(which) >= 8 and d.device_id.startswith(which))]
        if not matches:
            raise InvalidInputError(f"no device {which!r} (see `covey sync devices`)")
        if len(matches) > 1:
            raise InvalidInputError(f"{which!r} names {len(matches)} devices; use a device id")
        device = matches[0]
        if device.device_id == self.node:
            raise InvalidInputError("this is this device; to leave, erase it with "
                                    "`covey pod forget`")
        if device.revoked is not None:
            raise InvalidInputError(f"{device.device_id} was already revoked")
        revocation = self._rotate(key, device.device_id, reason)
        return Device(device.device_id, device.name, device.public_key, device.issued_at,
                      revocation, False)

    def _rotate(self, key: UserKey, device_id: str, reason: str) -> Revocation:
        """Revoke ``device_id`` with ``key`` and move every other current device to the
        new key, in one transaction."""
        with self._writing() as (conn, replica):
            revocation, successor, written = revoke(replica, key, device_id, reason)
            _save(conn, written)
            save_vector(conn, replica.vector)
            conn.execute("UPDATE user_identity SET private_key = ? WHERE id = 1",
                         (successor.private_bytes(),))
            lists = [e for e in written if e.collection == KEPT]
            _audit.append(conn, "sync.revoke", peer=device_id, detail={
                "reason": reason, "recertified": len(written) - len(lists) - 1,
                "kept": sum(len(unb64(e.value["ids"])) // 16 for e in lists)})
        return revocation

    def summary(self) -> dict[str, Any]:
        """Counts per collection (live and tombstones), never values."""
        counts: dict[str, dict[str, int]] = {}
        for (collection, _), entry in self.replica().entries.items():
            slot = counts.setdefault(collection, {"live": 0, "tombstones": 0})
            slot["tombstones" if entry.deleted else "live"] += 1
        return counts
