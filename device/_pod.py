"""The pod: a user's encrypted home on one device.

Files under the pod home:

    pod.key        the data key and the device key, wrapped by the passphrase (JSON, 0600)
    pod.db         the SQLCipher store (with pod.db-wal and pod.db-shm beside it)
    ledger.head    the privacy ledger's chain head, signed by the device key (0600)
    audit.head     the audit log's chain head, signed by the device key (0600)
    config.toml    optional settings (no user data)
    logs/          redacted logs
    FORGOTTEN      left by crypto-shredding: when, and nothing else
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import platform
import secrets
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from covey._time import utc_timestamp
from covey.device.assistant._conversations import Conversations
from covey.device.memory._memory import Memories
from covey.device.store import _audit, _keys
from covey.device.store._config import PodConfig, load_pod_config
from covey.device.store._schema import SCHEMA_VERSION, USER_TABLES
from covey.device.store._store import Store, StoreError
from covey.device.sync._entries import record_forgotten as _forgotten
from covey.errors import (
    InvalidInputError,
    PodExistsError,
    PodForgottenError,
    PodNotFoundError,
    StoreCorruptError,
)

__all__ = ["EXPORT_FORMAT", "DeviceIdentity", "Pod", "PodStatus"]

KEY_FILE = "pod.key"
DB_FILE = "pod.db"
TOMBSTONE = "FORGOTTEN"
EXPORT_FORMAT = "covey-export-1"
_log = logging.getLogger(__name__)



@dataclass(frozen=True)
class DeviceIdentity:
    """The device's Ed25519 key pair; ``device_id`` is derived from the public key."""

    device_id: str
    public_key: bytes
    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> DeviceIdentity:
        """A fresh identity."""
        private = Ed25519PrivateKey.generate()
        public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return cls(cls.id_for(public), public, private)

    @staticmethod
    def id_for(public_key: bytes) -> str:
        """The stable device id of a public key."""
        return "dev-" + hashlib.sha256(public_key).hexdigest()[:20]

    def sign(self, data: bytes) -> bytes:
        """Sign with the device key."""
        return self.private_key.sign(data)


@dataclass(frozen=True)
class PodStatus:
    """What `covey pod status` reports. Counts only: never content."""

    home: str
    pod_id: str
    name: str
    device_id: str
    public_key: str
    created_at: str
    schema_version: int
    cipher: dict[str, Any]
    kdf: dict[str, Any]
    counts: dict[str, int]
    audit_chain: dict[str, Any]
    integrity: list[str]
    database_bytes: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return dict(self.__dict__)


def _audit_head(home: Path, identity: DeviceIdentity) -> _audit.AuditHead:
    return _audit.AuditHead(home / _audit.HEAD_FILE, identity.device_id, identity.public_key,
                            identity.sign)


def _check_not_forgotten(home: Path) -> None:
    tomb = home / TOMBSTONE
    if tomb.exists():
        when = tomb.read_text(encoding="utf-8", errors="replace").strip() or "an unknown date"
        raise PodForgottenError(home, when.splitlines()[0][:40])


def _check_passphrase(passphrase: str, config: PodConfig) -> None:
    if len(passphrase) < config.min_passphrase_chars:
        raise InvalidInputError(
            f"a passphrase needs at least {config.min_passphrase_chars} characters"
        )


class Pod:
    """An unlocked pod. Open one with :meth:`create` or :meth:`open`; close it after use."""

    def __init__(self, home: Path, store: Store, config: PodConfig, device_key: bytes) -> None:
        self.home = home
        self.store = store
        self.config = config
        self.identity = self._load_identity(device_key)
        # A shared memory's erasure is tombstoned for the user's other pods, signed by
        # this device, in the deletion's own transaction.
        self.memories = Memories(store, on_erase=store.checkpoint, on_forget=partial(
            _forgotten, device_key=self.identity.private_key))
        self.conversations = Conversations(store)
        self.audit_head = _audit_head(home, self.identity)
        store.after_commit = self.audit_head.advance

    # -- lifecycle ---------------------------------------------------------------------

    @staticmethod
    def exists(home: Path) -> bool:
        """Whether a pod (or its tombstone) is at ``home``."""
        return (home / KEY_FILE).exists() or (home / TOMBSTONE).exists()

    @classmethod
    def create(cls, home: Path, passphrase: str, name: str | None = None,
               config: PodConfig | None = None) -> Pod:
        """Create a pod at ``home`` with a fresh data key and device identity.

        Raises:
            PodExistsError: a pod, or the tombstone of one, is already there.
        """
        home = home.expanduser().absolute()
        if cls.exists(home) or (home / DB_FILE).exists():
            raise PodExistsError(home)
        config = config or load_pod_config(home)
        _check_passphrase(passphrase, config)
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        data_key = _keys.new_data_key()
        identity = DeviceIdentity.generate()
        private = identity.private_key.private_bytes_raw()
        wrapped = _keys.wrap(data_key, passphrase, config.kdf, private, audit_head=True)
        store = Store(home / DB_FILE, data_key, config.busy_timeout_ms)
        try:
            now = utc_timestamp()
            with store.transaction() as c:
                c.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", [
                    ("pod_id", secrets.token_hex(16)),
                    ("name", name or platform.node() or "pod"),
                    ("created_at", now),
                ])
                c.execute(
                    "INSERT INTO identity (id, device_id, private_key, public_key, created_at)"
                    " VALUES (1, ?, X'', ?, ?)",  # the private key lives in the key file
                    (identity.device_id, identity.public_key, now),
                )
                _audit.append(c, "pod.created", detail={"schema": SCHEMA_VERSION})
            _audit_head(home, identity).start(store.conn)
            # The key file is written last: until it exists there is no pod to open.
            _keys.write_atomic(home / KEY_FILE, wrapped.to_json().encode())
        except BaseException:
            store.close()
            for name in (DB_FILE, DB_FILE + "-wal", DB_FILE + "-shm", _audit.HEAD_FILE):
                (home / name).unlink(missing_ok=True)
            raise
        pod = cls(home, store, config, private)
        pod._start_ledger()
        return pod

    @classmethod
    def open(cls, home: Path, passphrase: str, config: PodConfig | None = None) -> Pod:
        """Unlock the pod at ``home``.

        Raises:
            PodNotFoundError, PodForgottenError, WrongPassphraseError, StoreCorruptError.
        """
        home = home.expanduser().absolute()
        wrapped, data_key, device_key = cls._unwrap(home, passphrase)
        config = config or load_pod_config(home)
        if not (home / DB_FILE).exists():
            raise StoreCorruptError(home / DB_FILE, "the database file is missing")
        store = Store(home / DB_FILE, data_key, config.busy_timeout_ms)
        moved = not device_key
        if moved:
            device_key = cls._move_device_key(home, store, wrapped, data_key, passphrase)
        pod = cls(home, store, config, device_key)
        if moved:
            pod._start_ledger()
        if not wrapped.audit_head:
            pod._adopt_audit_chain()
            if pod.audit_head.exists():  # from now on a missing head is a broken chain
                _keys.write_atomic(home / KEY_FILE, _keys.wrap(
                    data_key, passphrase, wrapped.kdf, device_key,
                    audit_head=True).to_json().encode())
        _log.info("pod %s unlocked", pod.pod_id)
        return pod

    def _adopt_audit_chain(self) -> None:
        """A pod from before the signed audit head signs its chain once, if it holds
        (else no head is made, and the chain check says the log is broken)."""
        if not self.audit_head.exists() and self.audit_head.start(self.store.conn,
                                                                  legacy=True):
            self.audit("audit.head_adopted")

    def _start_ledger(self) -> None:
        """Sign the head of this device's (empty) ledger chain, adopting older rows."""
        from covey.device.federation._budget import pod_ledger

        pod_ledger(self).start()

    @classmethod
    def open_with_keys(cls, home: Path, data_key: bytes, device_key: bytes,
                       config: PodConfig | None = None) -> Pod:
        """Unlock the pod at ``home`` with its keys themselves (the round agent holds them
        while the pod takes part in federated rounds; see ``_round_agent``).

        Raises:
            PodNotFoundError, PodForgottenError, StoreCorruptError (also for a wrong key).
        """
        home = home.expanduser().absolute()
        _check_not_forgotten(home)
        if not (home / KEY_FILE).exists():
            raise PodNotFoundError(home)
        config = config or load_pod_config(home)
        if not (home / DB_FILE).exists():
            raise StoreCorruptError(home / DB_FILE, "the database file is missing")
        store = Store(home / DB_FILE, data_key, config.busy_timeout_ms)
        try:
            pod = cls(home, store, config, device_key)
        except BaseException:
            store.close()
            raise
        if not _keys.WrappedKey.from_file(home / KEY_FILE).audit_head:
            pod._adopt_audit_chain()  # the next unlock with the passphrase marks the key file
        return pod

    @classmethod
    def keys(cls, home: Path, passphrase: str) -> tuple[bytes, bytes]:
        """The pod's data key and device key, unwrapped with ``passphrase`` (an older
        pod's device key is moved into its key file first).

        Raises:
            PodNotFoundError, PodForgottenError, WrongPassphraseError, StoreCorruptError.
        """
        home = home.expanduser().absolute()
        wrapped, data_key, device_key = cls._unwrap(home, passphrase)
        if not device_key or not wrapped.audit_head:  # an older pod: bring it up to date
            cls.open(home, passphrase).close()
            _, data_key, device_key = cls._unwrap(home, passphrase)
        return data_key, device_key

    @staticmethod
    def _unwrap(home: Path, passphrase: str) -> tuple[_keys.WrappedKey, bytes, bytes]:
        _check_not_forgotten(home)
        key_file = home / KEY_FILE
        if not key_file.exists():
            raise PodNotFoundError(home)
        wrapped = _keys.WrappedKey.from_file(key_file)
        return (wrapped, *_keys.unwrap_keys(wrapped, passphrase))

    @staticmethod
    def _move_device_key(home: Path, store: Store, wrapped: _keys.WrappedKey,
                         data_key: bytes, passphrase: str) -> bytes:
        """A pod made before the device key moved to the key file: wrap it there, then
        erase the store's copy (secure_delete zeroes its page)."""
        rows = store.query("SELECT private_key FROM identity")
        if not rows or not rows[0][0]:
            store.close()
            raise StoreCorruptError(home / KEY_FILE, "the device key is missing")
        device_key = bytes(rows[0][0])
        _keys.write_atomic(home / KEY_FILE, _keys.wrap(data_key, passphrase, wrapped.kdf,
                                                       device_key).to_json().encode())
        with store.transaction() as c:
            c.execute("UPDATE identity SET private_key = X''")
            _audit.append(c, "key.device_key_moved")
        return device_key

    @classmethod
    def change_passphrase(cls, home: Path, old: str, new: str,
                          config: PodConfig | None = None) -> None:
        """Rewrap the data key under ``new``; the store is not re-encrypted.

        Raises:
            WrongPassphraseError: ``old`` does not unlock the pod (nothing changes).
        """
        home = home.expanduser().absolute()
        config = config or load_pod_config(home)
        _check_passphrase(new, config)
        with cls.open(home, old, config) as pod:  # moves an older pod's device key first
            _, data_key, device_key = cls._unwrap(home, old)
            wrapped = _keys.wrap(data_key, new, config.kdf, device_key,
                                 audit_head=pod.audit_head.exists())
            # Audit first: if the key file swap then fails, the old passphrase still works
            # and the log says a change was attempted.
            with pod.store.transaction() as c:
                _audit.append(c, "key.rewrapped", detail={"kdf": wrapped.kdf.__dict__})
            _keys.write_atomic(home / KEY_FILE, wrapped.to_json().encode())

    @staticmethod
    def forget(home: Path) -> list[str]:
        """Crypto-shred the pod: destroy the wrapped key, then remove every file.

        Safe to run again after an interruption. Returns the names of removed files.
        """
        home = home.expanduser().absolute()
        if not Pod.exists(home) and not (home / DB_FILE).exists():
            raise PodNotFoundError(home)
        tomb = home / TOMBSTONE
        if not tomb.exists():
            _keys.write_atomic(tomb, (datetime.now(UTC).date().isoformat() + "\n").encode())
        removed: list[str] = []
        # The wrapped key goes first: once it is gone the database is noise.
        if (home / KEY_FILE).exists():
            _keys.shred(home / KEY_FILE)
            removed.append(KEY_FILE)
        for entry in sorted(home.iterdir()):
            if entry.name == TOMBSTONE:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry.name)
        _keys.fsync_dir(home)
        return removed

    def close(self) -> None:
        """Lock the pod."""
        self.store.close()

    def __enter__(self) -> Pod:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- identity and metadata ---------------------------------------------------------

    def _load_identity(self, device_key: bytes) -> DeviceIdentity:
        rows = self.store.query("SELECT device_id, public_key FROM identity")
        if not rows:
            raise StoreCorruptError(self.store.path, "the device identity is missing")
        private = Ed25519PrivateKey.from_private_bytes(device_key)
        public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        if public != bytes(rows[0]["public_key"]):
            raise StoreCorruptError(self.store.path, "the device identity does not match "
                                                     "the key file")
        return DeviceIdentity(rows[0]["device_id"], public, private)

    def meta(self, key: str) -> str:
        """A value from the pod's metadata."""
        rows = self.store.query("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else ""

    @property
    def pod_id(self) -> str:
        """The pod's random id."""
        return self.meta("pod_id")

    @property
    def name(self) -> str:
        """The pod's name."""
        return self.meta("name")

    # -- audit -------------------------------------------------------------------------

    def audit(self, kind: str, *, peer: str = "", nbytes: int = 0, epsilon: float = 0.0,
              detail: dict[str, Any] | None = None) -> _audit.AuditEntry:
        """Record an event in the audit log (its own transaction)."""
        with self.store.transaction() as c:
            return _audit.append(c, kind, peer=peer, nbytes=nbytes, epsilon=epsilon,
                                 detail=detail)

    def verify_audit_chain(self) -> _audit.ChainCheck:
        """Check the audit log's hash chain against its signed head."""
        return _audit.verify(self.store.conn, self.audit_head)

    # -- status ------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Row counts of every user table and of the audit log."""
        return {t: int(self.store.query(f"SELECT count(*) FROM {t}")[0][0])  # noqa: S608
                for t in (*USER_TABLES, "audit_log")}

    def status(self) -> PodStatus:
        """Identity, encryption, counts, page integrity and the audit-chain check."""
        wrapped = _keys.WrappedKey.from_file(self.home / KEY_FILE)
        chain = self.verify_audit_chain()
        q = self.store.query
        cipher = {
            "engine": "SQLCipher " + str(q("PRAGMA cipher_version")[0][0]),
            "sqlite": str(q("SELECT sqlite_version()")[0][0]),
            "cipher": "AES-256-CBC with HMAC-SHA512 per page",
            "page_size": int(q("PRAGMA cipher_page_size")[0][0]),
            "key": "raw 256-bit data key (no SQLCipher KDF)",
            "journal_mode": str(q("PRAGMA journal_mode")[0][0]),
            "secure_delete": bool(q("PRAGMA secure_delete")[0][0]),
        }
        kdf = {"name": "argon2id", **wrapped.kdf.__dict__, "wrap": "AES-256-GCM",
               "wrapped_at": wrapped.created_at}
        size = sum(p.stat().st_size for p in self.home.glob(DB_FILE + "*") if p.is_file())
        return PodStatus(
            home=str(self.home), pod_id=self.pod_id, name=self.name,
            device_id=self.identity.device_id,
            public_key=base64.b64encode(self.identity.public_key).decode(),
            created_at=self.meta("created_at"), schema_version=self.store.schema_version,
            cipher=cipher, kdf=kdf, counts=self.counts(),
            audit_chain={"ok": chain.ok, "entries": chain.entries, "bad_seq": chain.bad_seq,
                         "reason": chain.reason, "signed": chain.signed},
            integrity=self.store.integrity_errors(),
            database_bytes=size,
        )

    # -- the right of access and portability -------------------------------------------

    def export(self) -> dict[str, Any]:
        """Everything the pod holds about its user, decrypted, as one JSON-ready document.

        The device's private key is not included: it identifies this device, not the user.
        """
        tables: dict[str, list[dict[str, Any]]] = {}
        for table in USER_TABLES:
            rows = self.store.query(f"SELECT * FROM {table} ORDER BY rowid")  # noqa: S608
            tables[table] = [{k: _jsonable(r[k]) for k in r.keys()} for r in rows]  # noqa: SIM118
        return {
            "format": EXPORT_FORMAT,
            "exported_at": utc_timestamp(),
            "schema_version": self.store.schema_version,
            "pod": {"pod_id": self.pod_id, "name": self.name,
                    "created_at": self.meta("created_at"),
                    "device_id": self.identity.device_id,
                    "public_key": base64.b64encode(self.identity.public_key).decode()},
            "tables": tables,
            "audit_log": [e.__dict__ for e in _audit.entries(self.store.conn)],
        }

    def write_export(self, path: Path) -> int:
        """Write :meth:`export` to ``path`` (mode 0600) and audit it; returns its size."""
        data = (json.dumps(self.export(), ensure_ascii=False, indent=1) + "\n").encode()
        path = path.expanduser().absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        _keys.write_atomic(path, data)
        self.audit("export", peer="user", nbytes=len(data),
                   detail={"tables": list(USER_TABLES)})
        return len(data)

    def restore(self, document: dict[str, Any]) -> dict[str, int]:
        """Load an export into this (empty) pod; returns rows restored per table.

        Raises:
            InvalidInputError: the document is not a covey export, or the pod is not empty.
        """
        if not isinstance(document, dict) or document.get("format") != EXPORT_FORMAT:
            raise InvalidInputError("not a covey export (missing format covey-export-1)")
        tables = document.get("tables")
        if not isinstance(tables, dict):
            raise InvalidInputError("the export has no tables")
        if any(self.counts()[t] for t in USER_TABLES):
            raise InvalidInputError("restore needs an empty pod")
        restored: dict[str, int] = {}
        try:
            self._restore_rows(tables, restored, document)
        except StoreError as exc:
            raise InvalidInputError(f"the export does not fit the schema ({exc})") from None
        return restored

    def _restore_rows(self, tables: dict[str, Any], restored: dict[str, int],
                      document: dict[str, Any]) -> None:
        tables = dict(tables)
        if "ledger" in tables:  # an export from before the signed ledger (schema < 7)
            tables["ledger_v6"] = tables.pop("ledger")
        with self.store.transaction() as c:
            for table in (*USER_TABLES, "ledger_v6"):
                rows = tables.get(table, [])
                columns = [r[1] for r in c.execute(f"PRAGMA table_info({table})")]
                for row in rows:
                    if not isinstance(row, dict) or set(row) - set(columns):
                        raise InvalidInputError(f"the export's {table} rows do not match schema")
                    names = list(row)
                    values = [_from_json(table, k, row[k]) for k in names]
                    c.execute(
                        f"INSERT INTO {table} ({', '.join(names)})"  # noqa: S608
                        f" VALUES ({', '.join('?' * len(names))})", values,
                    )
                restored[table] = len(rows)
            _trust_exporting_device(c, document, tables)
            source = document.get("pod", {}).get("pod_id", "")
            _audit.append(c, "import", peer="user", detail={"from_pod": source,
                                                            "rows": restored})


_BLOB_COLUMNS = {("memories", "embedding"), ("model_versions", "signature"),
                 ("privacy_ledger", "signature")}


def _trust_exporting_device(c: Any, document: dict[str, Any],
                            tables: dict[str, Any]) -> None:
    """The restored ledger's entries of the exporting device verify against its public
    key, from the export (they are counted whether or not they verify: more spend is
    never less private)."""
    pod = document.get("pod", {})
    if not isinstance(pod, dict) or not tables.get("privacy_ledger"):
        return
    try:
        key = base64.b64decode(str(pod["public_key"]), validate=True)
        device = str(pod["device_id"])
    except (KeyError, ValueError):
        return
    c.execute("INSERT OR IGNORE INTO ledger_keys (device_id, public_key) VALUES (?, ?)",
              (device, key))


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | memoryview):
        return {"base64": base64.b64encode(bytes(value)).decode()}
    return value


def _from_json(table: str, column: str, value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"base64"}:
        return base64.b64decode(value["base64"])
    if (table, column) in _BLOB_COLUMNS and value is not None:
        raise InvalidInputError(f"the export's {table}.{column} must be base64")
    return value

