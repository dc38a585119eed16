"""The facts of the pod report (``covey audit --pod``), gathered from the pod's own store.

:func:`covey.privacy.pod_report` renders and judges them; this module only reads: the
status, the database file's header, the recent user text the plaintext scan looks for,
the folders covey wrote for the pod, the ledger, the audit log and the consents.
"""

from __future__ import annotations

from covey._tempdirs import registered_folders
from covey.config import cache_dir
from covey.device._pod import DB_FILE, Pod
from covey.device.federation._budget import pod_ledger
from covey.device.store import _audit
from covey.privacy import PodAudit

__all__ = ["RECENT", "pod_audit"]

RECENT = 500  # the most recent rows of each kind of user text the scan looks for

# The user's own text, by table: what a copy in plaintext would leak.
_USER_TEXT = (("messages", ("content",)), ("memories", ("text",)),
              ("training_examples", ("prompt", "target")))


def _user_text(pod: Pod) -> list[tuple[str, str]]:
    """(record, text) of the ``RECENT`` latest rows of each table of user text."""
    records: list[tuple[str, str]] = []
    for table_name, columns in _USER_TEXT:
        cols = ", ".join(columns)
        rows = pod.store.query(
            f"SELECT id, {cols} FROM {table_name} ORDER BY id DESC LIMIT ?",  # noqa: S608
            (RECENT,))
        for row in rows:
            records.extend((f"{table_name}#{row[0]}", str(v)) for v in row[1:] if v)
    return records


def pod_audit(pod: Pod) -> PodAudit:
    """The facts of the unlocked ``pod`` that its privacy report is rendered from."""
    status = pod.status()
    db = pod.home / DB_FILE
    with db.open("rb") as f:
        header = f.read(16)
    kinds = pod.store.query("SELECT kind, COUNT(*) FROM memories GROUP BY kind ORDER BY kind")
    user_text = _user_text(pod)
    # Only the temporary folders covey registered when it made them: a person's own
    # folder in TMPDIR is not covey's, whatever its name.
    folders = [pod.home, cache_dir(), *registered_folders()]
    ledger = pod_ledger(pod)
    history, totals, check = ledger.history(), ledger.totals(), ledger.verify()
    consents = pod.store.query("SELECT scope, granted, updated_at FROM consents ORDER BY scope")
    return PodAudit(
        pod_id=pod.pod_id, name=pod.name, device_id=pod.identity.device_id,
        cipher=status.cipher, kdf=status.kdf, counts=status.counts,
        memory_kinds=[(str(k), int(n)) for k, n in kinds], database=db,
        database_header=header, database_bytes=status.database_bytes,
        audit_chain=status.audit_chain, recent=RECENT, user_text=user_text,
        scanned_folders=folders, policy=ledger.policy, ledger=history, totals=totals,
        ledger_check=check, audit_log=_audit.entries(pod.store.conn),
        consents=[(str(s), bool(g), str(t)) for s, g, t in consents])
