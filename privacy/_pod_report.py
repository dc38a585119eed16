"""The pod report (``covey audit --pod``): what this device holds, spent and sent.

Rendered from a :class:`PodAudit`, the facts the pod gathers from its own store: counts
by kind (never content), the encryption in force, a plaintext scan of every file covey
wrote for the pod, the epsilon ledger, the egress inventory from the audit log, the
audit-chain check, consents and erasures.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from covey.privacy._ledger import BudgetPolicy, LedgerCheck, LedgerEntry
from covey.privacy._report import Figure, flag, new_report, section, table
from covey.privacy._scan import files_under, needles_from, scan_files

__all__ = ["AuditEvent", "PodAudit", "pod_report"]


class AuditEvent(Protocol):
    """What the report reads of one entry of the pod's audit log."""

    @property
    def created_at(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def peer(self) -> str: ...
    @property
    def bytes(self) -> int: ...
    @property
    def epsilon(self) -> float: ...
    @property
    def detail(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class PodAudit:
    """The facts of an unlocked pod that its report is rendered from."""

    pod_id: str
    name: str
    device_id: str  # this device's, to tell its ledger rows from the user's other devices'
    cipher: dict[str, Any]
    kdf: dict[str, Any]
    counts: dict[str, int]  # rows of each table
    memory_kinds: list[tuple[str, int]]
    database: Path
    database_header: bytes  # the database file's first 16 bytes
    database_bytes: int  # the database and its journal
    audit_chain: dict[str, Any]  # ok, entries; or bad_seq and reason
    recent: int  # the most recent rows of each kind of user text gathered
    user_text: list[tuple[str, str]] = field(repr=False)  # (record, text): scan needles
    scanned_folders: list[Path]  # every folder covey wrote for the pod
    policy: BudgetPolicy
    ledger: list[LedgerEntry]  # oldest first
    totals: list[float]  # the user's epsilon after each ledger entry
    ledger_check: LedgerCheck
    audit_log: Sequence[AuditEvent]
    consents: list[tuple[str, bool, str]]  # scope, granted, since

# Where each kind of audited event sends data.
_DESTINATIONS = {"federated_update": "aggregator", "context_stats": "aggregator",
                 "round_refused": "aggregator",
                 "api.response": "local API client",
                 "export": "user (export file)", "sync": "paired device",
                 "generator.request": "model server"}


# Audited events of those kinds that send nothing (a refusal, a revocation, a new user key).
_NOTHING_SENT = {"sync.refused", "sync.revoke", "sync.user"}


def _destination(kind: str) -> str | None:
    if kind in _NOTHING_SENT:
        return None
    for prefix, where in _DESTINATIONS.items():
        if kind == prefix or kind.startswith(prefix + "."):
            return where
    return None


def _encryption(pod: PodAudit, report: dict[str, Any]) -> None:
    sec = section(report, "encryption", "Encryption in force")
    table(sec, ["setting", "value"], [[k, v] for k, v in pod.cipher.items()],
          "database")
    table(sec, ["setting", "value"], [[k, v] for k, v in pod.kdf.items()],
          "passphrase key derivation and key wrapping")
    db = pod.database
    plain = pod.database_header.startswith(b"SQLite format 3")
    sec["notes"].append("The database file starts with random bytes, as an encrypted "
                        "SQLCipher file does." if not plain else
                        "The database file starts with a plaintext SQLite header.")
    if plain:
        flag(report, "plaintext", f"{db} is an unencrypted SQLite file")
    counts = section(report, "storage", "What the pod stores (counts, never content)")
    table(counts, ["table", "rows"], sorted(pod.counts.items()))
    table(counts, ["memory kind", "rows"], [[k, n] for k, n in pod.memory_kinds],
          "memories by kind")
    counts["notes"].append(f"Database and its journal: {pod.database_bytes:,} bytes.")
    chain = section(report, "audit-chain", "Audit chain")
    if pod.audit_chain["ok"]:
        chain["notes"].append(f"All {pod.audit_chain['entries']} entries verify: each "
                              "hash matches its content and links to the one before, and "
                              "the head signed by the device key (kept outside the store) "
                              "matches its entry.")
    else:
        bad = pod.audit_chain
        chain["notes"].append(f"The chain breaks at entry {bad['bad_seq']}: {bad['reason']}.")
        flag(report, "broken_chain",
             f"audit log broken at entry {bad['bad_seq']}: {bad['reason']}")


def _plaintext(pod: PodAudit, report: dict[str, Any]) -> None:
    needles = needles_from(pod.user_text)
    files = files_under(*pod.scanned_folders)
    hits, count, scanned = scan_files(files, needles)
    sec = section(report, "plaintext-scan", "Plaintext scan")
    sec["notes"].append(
        f"Looked for {len(needles)} pieces of the user's own recent text (the latest "
        f"{pod.recent} messages, memories and training examples of at least 12 characters) "
        f"in {count} files, {scanned:,} bytes: the pod home (database, journal, keys, "
        "logs), covey's cache folder and the temporary folders covey made.")
    rows = [[h.path, h.offset, h.source] for h in hits]
    table(sec, ["file", "byte offset", "text of"], rows, "hits")
    for h in hits:
        flag(report, "plaintext", f"text of {h.source} found in plaintext in {h.path} at "
                                  f"byte {h.offset}")
    report["summary"]["plaintext_hits"] = len(hits)
    report["summary"]["files_scanned"] = count


def _ledger(pod: PodAudit, report: dict[str, Any]) -> None:
    policy, history, totals, check = pod.policy, pod.ledger, pod.totals, pod.ledger_check
    cumulative = [t if math.isfinite(t) else None for t in totals]
    non_private = sum(1 for e in history if e.release.rounds and not e.release.private)
    table_rows = [[e.created_at, e.release.run_id, e.release.round, e.release.kind,
                   e.release.mode, e.release.noise_multiplier, e.release.sensitivity,
                   e.release.sample_rate, e.release.clip_norm, e.release.rounds,
                   "this pod" if e.device_id == pod.device_id else e.device_id,
                   total if math.isfinite(total) else "inf"]
                  for e, total in zip(history, totals, strict=True)]
    spent = cumulative[-1] if cumulative else 0.0
    sec = section(report, "ledger", "Privacy budget: the epsilon ledger")
    sec["notes"].append(
        f"Each row is one release of user-derived information, by this pod or another of "
        f"the user's pods. The total composes every Gaussian release "
        f"({policy.accountant.upper()} accountant, noise z over sensitivity) at the "
        f"user's delta {policy.delta:g}; the user's maximum is epsilon "
        f"{policy.max_epsilon:g}. Central-DP rows charge a whole planned run (z, sampling "
        "rate q, rounds) at the user's first participation, once per user; local-DP rows "
        "charge one release each, without amplification, at sensitivity 2C.")
    sec["notes"].append(
        f"The ledger's signed hash chain: {'intact' if check.ok else 'BROKEN: ' + check.reason}"
        f" ({check.entries} entries).")
    table(sec, ["when", "run", "round", "kind", "mode", "z", "sensitivity (x C)", "q", "C",
                "rounds charged", "device", "total epsilon"], table_rows)
    if history:
        sec["figures"].append(Figure("Epsilon spent over time", "ledger row",
                                     f"epsilon at delta {policy.delta:g}")
                              .line("total spent", list(range(1, len(history) + 1)),
                                    cumulative, step=True)
                              .guide(f"user's maximum {policy.max_epsilon:g}",
                                     policy.max_epsilon).to_dict())
    if not check.ok:
        flag(report, "broken_chain", f"the privacy ledger does not verify: {check.reason}")
    for device in check.forked:
        flag(report, "broken_chain", f"the user's device {device} spent again after its store "
                                     "was put back to an earlier copy (both branches count)")
    if non_private:
        flag(report, "non_private_release", f"{non_private} ledger rows released "
                                            "information without noise")
    elif spent is not None and spent > policy.max_epsilon * (1 + 1e-9):
        flag(report, "epsilon_over_target", f"the ledger has spent epsilon {spent:.3g}, over "
                                            f"the user's maximum of {policy.max_epsilon:g}")
    report["summary"].update(epsilon_spent=spent if spent is not None else "inf",
                             max_epsilon=policy.max_epsilon, delta=policy.delta)


def _egress(pod: PodAudit, report: dict[str, Any]) -> None:
    entries = pod.audit_log
    groups: dict[tuple[str, str, str], list[AuditEvent]] = defaultdict(list)
    for e in entries:
        where = _destination(e.kind)
        if where is not None:
            groups[(where, e.kind, e.peer)].append(e)
    # An entry's epsilon is the user's total after it: the last one says it all (adding
    # totals up would count every earlier release again).
    rows: list[list[Any]] = [
        [where, kind, peer or "-", len(es), sum(e.bytes for e in es),
         max(e.epsilon for e in es), es[0].created_at, es[-1].created_at]
        for (where, kind, peer), es in sorted(groups.items())]
    sec = section(report, "egress", "Egress: everything that left the pod")
    sec["notes"].append("From the audit log: every response to another process, update to "
                        "an aggregator, export and sync is recorded in the same transaction "
                        "as the event, and every prompt sent to a model server (the openai "
                        "generator) before it is sent (sizes and peers, never content).")
    table(sec, ["destination", "kind", "peer", "events", "bytes",
                "user's epsilon after the last", "first", "last"], rows)
    _prompts_sent(entries, sec)
    by_dest: dict[str, int] = defaultdict(int)
    for row in rows:
        by_dest[row[0]] += int(row[4])
    report["summary"]["egress_bytes"] = dict(by_dest)
    people = section(report, "consents", "Consents and erasures")
    table(people, ["scope", "granted", "since"], [list(c) for c in pod.consents], "consents")
    erasures = [[e.created_at, e.detail.get("table", "-"), e.detail.get("rows", 0)]
                for e in entries if e.kind == "erasure"]
    table(people, ["when", "table", "rows erased"], erasures, "erasures")


def _prompts_sent(entries: Sequence[AuditEvent], sec: dict[str, Any]) -> None:
    """What the prompts sent to model servers held: kinds of data and counts, by host."""
    kinds = ("system", "preferences", "memories", "context", "recent_turns", "message")
    by_host: dict[tuple[str, str], list[int]] = {}
    for e in entries:
        if e.kind == "generator.request":
            row = by_host.setdefault((e.peer, str(e.detail.get("allowed_by", "-"))),
                                     [0] * (2 + len(kinds)))
            row[0] += 1
            row[1] += e.bytes
            prompt = e.detail.get("prompt", {})
            for i, kind in enumerate(kinds):
                row[2 + i] += int(prompt.get(kind, 0))
    table(sec, ["model server", "allowed by", "prompts", "bytes",
                *[f"{k.replace('_', ' ')} (items)" for k in kinds]],
          [[host, allowed, *row] for (host, allowed), row in sorted(by_host.items())],
          "prompts sent to model servers: what they held (counts, never text)")


def pod_report(pod: PodAudit) -> dict[str, Any]:
    """The report of a pod, from its facts."""
    report = new_report("pod", f"Privacy audit of pod {pod.name or pod.pod_id}")
    report["summary"] = {"pod_id": pod.pod_id}
    _encryption(pod, report)
    _plaintext(pod, report)
    _ledger(pod, report)
    _egress(pod, report)
    return report

