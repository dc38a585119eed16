"""The privacy ledger: every release of a user's information, composed into the user's
epsilon and held to the user's maximum.

One :class:`Ledger` over a :class:`LedgerStorage` the pod implements. It is the only
writer and the only reader of the budget:

- :meth:`Ledger.spend` composes the ledger with a new release, checks the user's maximum
  and writes the entry, or refuses, in one transaction;
- :meth:`Ledger.spent` and :meth:`Ledger.history` are the only readers.

Entries are append-only and hash-chained per device: entry ``n`` of a device carries the
hash of entry ``n - 1``, and its own hash is SHA-256 of that and its canonical body; the
device signs each hash with its Ed25519 key. The chain head (the last sequence number and
hash, signed) is also kept *outside* the store. The device key is not in the store (it is
wrapped beside the data key), so whoever can rewrite the store with the data key alone
can neither truncate nor rewrite this device's chain without :meth:`Ledger.verify`
saying so, and a pod refuses to spend from a ledger that does not verify.

User-level composition: a user's ledger is the union of the chains of all of the user's
devices (entries from other devices arrive through sync, signed by their device). Central
runs are charged once per user and run: a central-mode run costs (z, q, T) whether the
user took part in one round or all of them, so entries of one run with the same pinned
parameters count once, whichever pods wrote them; local releases each count.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from covey._time import utc_timestamp
from covey.errors import CoveyError
from covey.privacy._accounting import GaussianRounds, get_accountant

__all__ = [
    "GENESIS",
    "BudgetExceeded",
    "BudgetPolicy",
    "Ledger",
    "LedgerCheck",
    "LedgerEntry",
    "LedgerStorage",
    "LedgerTampered",
    "Release",
    "RunChanged",
    "verify_signature",
]

GENESIS = "0" * 64
_HEAD_CONTEXT = b"covey-ledger-head-v1\0"
KINDS = ("federated_update", "usage_histogram")


class BudgetExceeded(CoveyError):
    """A release would take the user past their maximum epsilon (nothing was written)."""

    exit_code = 2

    def __init__(self) -> None:
        # No figures: this message may travel to an aggregator.
        super().__init__("refused: this release would exceed the user's privacy budget")


class RunChanged(CoveyError):
    """A run asked for a release with other privacy parameters than it was pinned to."""

    exit_code = 2

    def __init__(self, run_id: str, what: str) -> None:
        super().__init__(f"refused: run {run_id} changed its {what} after the user's "
                         "first release in it")


class LedgerTampered(CoveyError):
    """The ledger does not verify: rows or the chain head were changed or removed."""

    exit_code = 8

    def __init__(self, reason: str) -> None:
        super().__init__(f"the privacy ledger does not verify ({reason}); the pod refuses "
                         "to release anything until it is restored from an export")


@dataclass(frozen=True)
class BudgetPolicy:
    """The user's privacy budget: the most epsilon (at ``delta``) any releases may take."""

    max_epsilon: float = 10.0
    delta: float = 1e-5
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        if any(isinstance(v, bool) or not isinstance(v, numbers.Real)
               for v in (self.max_epsilon, self.delta)):
            raise ValueError("the maximum epsilon and delta are numbers")
        if not self.max_epsilon >= 0 or not math.isfinite(self.max_epsilon):
            raise ValueError("the maximum epsilon must be a finite number >= 0")
        if not 0 < self.delta < 1:
            raise ValueError("delta must be in (0, 1)")
        get_accountant(self.accountant)

    @classmethod
    def from_dict(cls, value: Any) -> BudgetPolicy:
        """A policy as synced (``{"max_epsilon": x, "delta": y}``); raises ValueError."""
        if not isinstance(value, dict) or set(value) != {"max_epsilon", "delta"}:
            raise ValueError("a budget policy has exactly max_epsilon and delta")
        return cls(value["max_epsilon"], value["delta"])


@dataclass(frozen=True)
class Release:
    """One release of user-derived information, with what the accountant charges for it.

    ``noise_multiplier`` is z, the noise's standard deviation over ``clip_norm``;
    ``sensitivity`` is the release's L2 sensitivity in units of ``clip_norm`` (1 under
    add/remove, 2 under replace-one); the accountant composes ``rounds`` Gaussian
    releases of multiplier z / sensitivity at ``sample_rate``.
    """

    kind: str
    run_id: str
    round: int
    mode: str
    noise_multiplier: float
    clip_norm: float
    sensitivity: float
    sample_rate: float
    planned_rounds: int
    rounds: int
    run_delta: float
    adaptive: bool = False
    model_version: str = ""
    peer: str = ""
    nbytes: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown release kind {self.kind!r}")
        if self.mode not in ("central", "local"):
            raise ValueError(f"unknown mode {self.mode!r}")
        if not self.noise_multiplier >= 0 or not self.sensitivity > 0:
            raise ValueError("noise multiplier must be >= 0 and sensitivity > 0")
        if not 0 < self.sample_rate <= 1 or self.rounds < 0 or self.planned_rounds < 0:
            raise ValueError("sample rate must be in (0, 1], rounds >= 0")

    @property
    def private(self) -> bool:
        """Whether the release carries a DP guarantee at all."""
        return self.noise_multiplier > 0 and math.isfinite(self.clip_norm)

    def segment(self) -> GaussianRounds | None:
        """What the accountant composes (None when the entry charges nothing)."""
        if not self.rounds:
            return None
        return GaussianRounds(self.noise_multiplier / self.sensitivity, self.sample_rate,
                              self.rounds)

    def pins(self) -> dict[str, Any]:
        """What a run may not change once the user released in it: mode, z, q, T, its
        delta and, unless the run adapts it, the clip norm."""
        return {"kind": self.kind, "mode": self.mode, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "planned_rounds": self.planned_rounds,
                "run_delta": self.run_delta, "adaptive": self.adaptive,
                "clip_norm": None if self.adaptive else self.clip_norm}


def _canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass(frozen=True)
class LedgerEntry:
    """One signed, chained row of a device's ledger."""

    device_id: str
    seq: int
    created_at: str
    release: Release
    epsilon: float  # the user's epsilon after this entry, at the user's delta (inf allowed)
    prev_hash: str = GENESIS
    hash: str = ""
    signature: bytes = b""

    def body(self) -> bytes:
        """The canonical bytes the hash covers."""
        return _canonical({"device_id": self.device_id, "seq": self.seq,
                           "created_at": self.created_at, "release": asdict(self.release),
                           "epsilon": self.epsilon if math.isfinite(self.epsilon) else "inf"})

    def digest(self) -> str:
        """SHA-256 of the previous hash and the body."""
        return hashlib.sha256(self.prev_hash.encode() + self.body()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON (what sync and exports carry)."""
        return {**json.loads(self.body()), "prev_hash": self.prev_hash, "hash": self.hash,
                "signature": self.signature.hex()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LedgerEntry:
        """Parse an entry (raises ValueError, KeyError or TypeError)."""
        epsilon = d["epsilon"]
        return cls(str(d["device_id"]), int(d["seq"]), str(d["created_at"]),
                   Release(**d["release"]), math.inf if epsilon == "inf" else float(epsilon),
                   str(d["prev_hash"]), str(d["hash"]), bytes.fromhex(str(d["signature"])))


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` is the Ed25519 signature of ``data`` by ``public_key``."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


class LedgerStorage(Protocol):
    """Where a ledger lives; the pod implements it over its encrypted store."""

    #: This device's id; its entries are the ones :meth:`append` writes.
    device_id: str

    def transaction(self) -> AbstractContextManager[object]:
        """One write transaction, serialized with every other writer."""
        ...

    def entries(self) -> list[LedgerEntry]:
        """Every stored entry: this device's and the user's other devices', each
        device's in sequence order."""
        ...

    def append(self, entry: LedgerEntry) -> None:
        """Store an entry of this device (inside :meth:`transaction`)."""
        ...

    def read_head(self) -> dict[str, Any] | None:
        """The signed chain head kept outside the store (None before the first entry)."""
        ...

    def write_head(self, head: dict[str, Any]) -> None:
        """Replace the signed chain head (after the entry's transaction committed)."""
        ...

    def sign(self, data: bytes) -> bytes:
        """Sign with this device's key."""
        ...

    def public_key(self, device_id: str) -> bytes | None:
        """The Ed25519 public key of a device of the user (this device's from its key
        file, never from the store), or None when unknown."""
        ...


@dataclass(frozen=True)
class LedgerCheck:
    """The outcome of :meth:`Ledger.verify`."""

    ok: bool
    entries: int
    reason: str = ""
    unverified: list[str] = field(default_factory=list)  # other devices with no known key
    forked: list[str] = field(default_factory=list)  # other devices that spent twice over



class Ledger:
    """A user's privacy ledger on one device."""

    def __init__(self, storage: LedgerStorage, policy: BudgetPolicy) -> None:
        self.storage = storage
        self.policy = policy

    # -- reading -------------------------------------------------------------------

    def history(self) -> list[LedgerEntry]:
        """Every entry, this device's and the user's other devices', oldest first."""
        return sorted(self.storage.entries(), key=lambda e: (e.created_at, e.device_id, e.seq))

    def spent(self, extra: Release | None = None) -> float:
        """The user's epsilon at the user's delta (plus ``extra``, a release of this
        device); inf after any release without noise."""
        items = [(e.device_id, e.release) for e in self.storage.entries()]
        return self._compose(items + ([(self.storage.device_id, extra)] if extra else []))

    def totals(self) -> list[float]:
        """The user's epsilon after each entry of :meth:`history`, recomposed now."""
        items = [(e.device_id, e.release) for e in self.history()]
        return [self._compose(items[:i + 1]) for i in range(len(items))]

    def _compose(self, items: Sequence[tuple[str, Release]]) -> float:
        """Compose (device, release) pairs: each central run once per user, at the
        sensitivity of the most of the user's pods that answered one of its rounds (two
        pods holding different user keys while a new one spreads may both answer: the
        user then moved the sum by 2C, not C); every other release on its own."""
        central: dict[str, GaussianRounds] = {}
        answered: dict[tuple[str, int], set[str]] = {}
        segments: list[GaussianRounds] = []
        for device, r in items:
            if r.mode == "central" and r.kind == "federated_update" and r.round >= 1:
                # round 0: the run's charge when it was announced, to all the user's pods
                answered.setdefault((r.run_id, r.round), set()).add(device)
        for _, r in items:
            segment = r.segment()
            if segment is None:
                continue
            if not r.private:
                return math.inf
            if r.mode == "central" and r.kind == "federated_update":
                pods = max((len(d) for (run, _), d in answered.items() if run == r.run_id),
                           default=1)
                segment = GaussianRounds(segment.noise_multiplier / pods,
                                         segment.sample_rate, segment.rounds)
                key = r.run_id + _canonical(r.pins()).decode()
                if key not in central or (segment.rounds, -segment.noise_multiplier) > (
                        central[key].rounds, -central[key].noise_multiplier):
                    central[key] = segment
            else:
                segments.append(segment)
        history = [*central.values(), *segments]
        if not history:
            return 0.0
        return get_accountant(self.policy.accountant).epsilon(history, self.policy.delta)

    def charged_rounds(self, run_id: str) -> int:
        """Rounds of ``run_id`` the user has already been charged for, by any of their pods."""
        return max((e.release.rounds for e in self.storage.entries()
                    if e.release.run_id == run_id and e.release.kind == "federated_update"),
                   default=0)

    def check_pins(self, release: Release) -> None:
        """Refuse a release whose run changed its privacy parameters (RunChanged)."""
        pins = release.pins()
        for e in self.storage.entries():
            if e.release.run_id != release.run_id or e.release.kind != release.kind:
                continue
            before = e.release.pins()
            for name, value in pins.items():
                if before[name] != value:
                    raise RunChanged(release.run_id, name.replace("_", " "))

    # -- writing -------------------------------------------------------------------

    def check(self, release: Release) -> float:
        """What the user's epsilon would be after ``release``; raises LedgerTampered,
        RunChanged or BudgetExceeded instead of writing."""
        result = self.verify()
        if not result.ok:
            raise LedgerTampered(result.reason)
        self.check_pins(release)
        total = self.spent(release)
        if total > self.policy.max_epsilon:
            raise BudgetExceeded()
        return total

    def spend(self, release: Release,
              also: Callable[[Any, LedgerEntry], None] | None = None) -> LedgerEntry:
        """Compose, check the maximum and write ``release`` in one transaction.

        ``also(transaction, entry)`` runs inside the same transaction (the pod's audit
        entry commits with the ledger's). The signed head is written once it committed.

        Raises:
            LedgerTampered, RunChanged, BudgetExceeded: nothing was written.
        """
        with self.storage.transaction() as tx:
            total = self.check(release)
            own = [e for e in self.storage.entries() if e.device_id == self.storage.device_id]
            last = own[-1] if own else None
            entry = LedgerEntry(self.storage.device_id, (last.seq if last else 0) + 1,
                                utc_timestamp(), release, total,
                                last.hash if last else GENESIS)
            digest = entry.digest()
            entry = LedgerEntry(entry.device_id, entry.seq, entry.created_at, release, total,
                                entry.prev_hash, digest,
                                self.storage.sign(bytes.fromhex(digest)))
            self.storage.append(entry)
            if also is not None:
                also(tx, entry)
        self._write_head(entry)
        return entry

    def start(self) -> None:
        """Sign the head of an empty chain (sequence 0): from then on a missing head, or
        one behind the entries' own, shows that the chain was cut."""
        if self.storage.read_head() is not None:
            return
        own = [e for e in self.storage.entries() if e.device_id == self.storage.device_id]
        if own:
            raise LedgerTampered("entries exist but the signed chain head is missing")
        self.seal()

    def seal(self) -> None:
        """Sign what the ledger holds now and keep it outside the store: this device's
        chain head, the newest entry held of every other device of the user, and the
        user's budget policy. Call it after a change the pod itself made (a spend, a
        policy the user set, entries received from the user's pods), never to bless a
        ledger that did not verify before the change."""
        own: LedgerEntry | None = None
        others: dict[str, dict[str, Any]] = {}
        for e in self.storage.entries():
            if e.device_id == self.storage.device_id:
                own = e if own is None or e.seq > own.seq else own
            elif e.device_id not in others or e.seq > others[e.device_id]["seq"]:
                others[e.device_id] = {"seq": e.seq, "hash": e.hash}
        head = {"device_id": self.storage.device_id, "seq": own.seq if own else 0,
                "hash": own.hash if own else GENESIS, "others": others,
                "policy": {"max_epsilon": self.policy.max_epsilon, "delta": self.policy.delta,
                           "accountant": self.policy.accountant}}
        self.storage.write_head({**head, "signature": self.storage.sign(
            _HEAD_CONTEXT + _canonical(head)).hex()})

    def _write_head(self, entry: LedgerEntry) -> None:
        self.seal()

    # -- checking ------------------------------------------------------------------

    def verify(self) -> LedgerCheck:
        """Recompute every chain, check every signature, and compare this device's chain
        with the signed head kept outside the store."""
        by_device: dict[str, list[LedgerEntry]] = {}
        for e in self.storage.entries():
            by_device.setdefault(e.device_id, []).append(e)
        unverified = []
        forked = [d for d, chain in by_device.items() if d != self.storage.device_id
                  and len({e.seq for e in chain}) != len(chain)]
        count = 0
        for device, chain in by_device.items():
            key = self.storage.public_key(device)
            if key is None:
                unverified.append(device)  # counted (more spend is safe), not trusted more
            # Another device's chain may still be arriving: its gaps are not tampering.
            reason = _check_chain(chain, key, strict=device == self.storage.device_id)
            if reason:
                return LedgerCheck(False, count, f"device {device}: {reason}")
            count += len(chain)
        reason = self._check_head(by_device)
        if reason:
            return LedgerCheck(False, count, reason)
        return LedgerCheck(True, count, unverified=unverified, forked=forked)

    def _check_head(self, by_device: dict[str, list[LedgerEntry]]) -> str:
        own = by_device.get(self.storage.device_id, [])
        head = self.storage.read_head()
        key = self.storage.public_key(self.storage.device_id)
        if head is None:  # a pod signs an empty chain's head when it is made
            return "the signed chain head is missing"
        try:
            seq, digest = int(head["seq"]), str(head["hash"])
            signature = bytes.fromhex(str(head["signature"]))
            body = {k: v for k, v in head.items() if k != "signature"}
        except (KeyError, TypeError, ValueError, AttributeError):
            return "the signed chain head is unreadable"
        if key is None or head.get("device_id") != self.storage.device_id or \
                not verify_signature(key, signature, _HEAD_CONTEXT + _canonical(body)):
            return "the chain head is not signed by this device"
        if len(own) < seq:
            return f"entries after {len(own)} were removed (the signed head is at {seq})"
        if (own[seq - 1].hash if seq else GENESIS) != digest:
            return f"entry {seq} differs from the signed head"
        for device, newest in dict(head.get("others", {})).items():
            held = {(e.seq, e.hash) for e in by_device.get(device, [])}
            if (newest.get("seq"), newest.get("hash")) not in held:
                return f"entries of the user's device {device} were removed"
        policy = head.get("policy")
        if policy is not None and (
                policy.get("max_epsilon") != self.policy.max_epsilon
                or policy.get("delta") != self.policy.delta
                or policy.get("accountant") != self.policy.accountant):
            return "the budget policy was changed outside the pod"
        return ""


def _check_chain(chain: list[LedgerEntry], key: bytes | None, strict: bool) -> str:
    """Why ``chain`` (one device's entries, by sequence number) does not verify, or "".

    Every entry must match its hash and its device's signature. ``strict`` (this
    device's own chain): numbered 1, 2, 3... without a gap, each linked to the one before,
    and never two different entries with one number (a store put back to an earlier
    copy and spent again). Another device's chain may still be arriving, and a fork of
    it is counted whole, so neither is an error there.
    """
    seqs = [e.seq for e in chain]
    if strict and len(set(seqs)) != len(seqs):
        fork = next(n for n in seqs if seqs.count(n) > 1)
        return f"two different entries {fork}: the store was rolled back and spent again"
    prev = GENESIS
    for number, e in enumerate(chain, start=1):
        if strict and e.seq != number:
            return f"entry {number} is missing"
        if strict and e.prev_hash != prev:
            return f"entry {e.seq} does not link to the entry before it"
        if e.digest() != e.hash:
            return f"entry {e.seq} does not match its hash"
        if key is not None and not verify_signature(key, e.signature, bytes.fromhex(e.hash)):
            return f"entry {e.seq} is not signed by its device"
        prev = e.hash
    return ""
