"""The pod store: one SQLCipher database, keyed with the pod's raw data key.

Durability and sharing settings, and why:
- WAL journal with ``synchronous=FULL``: a commit that returned is on disk, even
  across power loss, and readers do not block the writer.
- ``busy_timeout``: a second process on the same pod waits for the lock, not fails.
- Writes start with ``BEGIN IMMEDIATE`` so two writers never deadlock on upgrade.
- ``secure_delete``: deleted rows are overwritten with zeros in the file pages.
- ``temp_store=MEMORY``: sorts and temporary tables never spill to plaintext files.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlcipher3.dbapi2 as sqlite

from covey.device.store._schema import MIGRATIONS, SCHEMA_VERSION
from covey.errors import DiskFullError, PodLockedError, StoreCorruptError

__all__ = ["Store", "StoreError", "set_meta"]

StoreError = sqlite.Error

_CORRUPT = {sqlite.SQLITE_CORRUPT, sqlite.SQLITE_NOTADB}
_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


class Store:
    """A connection to a pod database with covey's pragmas, migrations and error mapping.

    ``key=None`` opens plain SQLite through the same engine: only benchmarks and tests
    that inspect raw pages use it; a pod never does.
    """

    def __init__(self, path: Path, key: bytes | None, busy_timeout_ms: int = 10_000) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        # Runs after each committed transaction (the pod moves its signed audit head).
        self.after_commit: Callable[[sqlite.Connection], None] | None = None
        if not path.exists():
            # SQLite gives the -wal and -shm files the main file's mode: owner only.
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        with self._mapped_errors():
            self.conn = sqlite.connect(
                str(path), isolation_level=None, timeout=busy_timeout_ms / 1000,
                check_same_thread=False,
            )
        self.conn.row_factory = sqlite.Row
        try:
            with self._mapped_errors():
                # SQLCipher would print page errors to stderr; we report them as one line.
                self.conn.execute("PRAGMA cipher_log_level = NONE")
                if key is not None:
                    # A raw key: SQLCipher skips its own PBKDF2, the DEK is already random.
                    self.conn.execute(f"PRAGMA key = \"x'{key.hex()}'\"")
                # The first read of page 1 authenticates the key (HMAC) and the header.
                self.conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
                self._configure()
                self._migrate()
        except BaseException:
            self.conn.close()
            raise

    def _configure(self) -> None:
        c = self.conn
        c.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        mode = c.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise StoreCorruptError(self.path, f"cannot enable WAL (journal mode {mode})")
        c.execute("PRAGMA synchronous = FULL")
        c.execute("PRAGMA secure_delete = ON")
        c.execute("PRAGMA foreign_keys = ON")
        c.execute("PRAGMA temp_store = MEMORY")

    def _migrate(self) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreCorruptError(
                self.path, f"schema {version} is newer than this covey ({SCHEMA_VERSION})"
            )
        for number in range(version, SCHEMA_VERSION):
            with self.transaction() as c:
                # Re-read inside the write lock: another process may have migrated.
                if c.execute("PRAGMA user_version").fetchone()[0] != number:
                    continue
                for statement in _statements(MIGRATIONS[number]):
                    c.execute(statement)
                c.execute(f"PRAGMA user_version = {number + 1}")

    @property
    def schema_version(self) -> int:
        """The number of migrations applied."""
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    @contextmanager
    def transaction(self) -> Iterator[sqlite.Connection]:
        """A write transaction: committed (durably) on exit, rolled back on error."""
        with self._mapped_errors():
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")
            if self.after_commit is not None:
                self.after_commit(self.conn)

    def query(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[sqlite.Row]:
        """Run a read and return all rows."""
        with self._mapped_errors():
            return self.conn.execute(sql, params).fetchall()

    def integrity_errors(self) -> list[str]:
        """Run SQLCipher's page authentication and SQLite's integrity check."""
        with self._mapped_errors():
            problems = [r[0] for r in self.conn.execute("PRAGMA cipher_integrity_check")]
            rows = [r[0] for r in self.conn.execute("PRAGMA integrity_check")]
        return problems + [r for r in rows if r != "ok"]

    def checkpoint(self) -> None:
        """Fold the WAL into the database and truncate it (after erasures)."""
        with self._mapped_errors():
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()

    @contextmanager
    def _mapped_errors(self) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        except sqlite.Error as exc:
            raise self._translate(exc, time.monotonic() - started) from None

    def _translate(self, exc: sqlite.Error, waited: float) -> Exception:
        code = getattr(exc, "sqlite_errorcode", None)
        primary = code & 0xFF if isinstance(code, int) else None
        if primary in (sqlite.SQLITE_BUSY, sqlite.SQLITE_LOCKED):
            return PodLockedError(self.path.parent, round(waited, 1))
        if primary == sqlite.SQLITE_FULL or (
            primary == sqlite.SQLITE_IOERR and _disk_is_full(self.path)
        ):
            return DiskFullError(self.path)
        if primary in _CORRUPT:
            return StoreCorruptError(self.path, str(exc))
        if primary == sqlite.SQLITE_IOERR:
            return StoreCorruptError(self.path, f"I/O error: {exc}")
        return exc


def set_meta(conn: sqlite.Connection, key: str, value: str) -> None:
    """Set a metadata value inside the caller's transaction."""
    conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)"
                 " ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))


def _disk_is_full(path: Path) -> bool:
    """Whether a write to ``path``'s folder fails for lack of space (IOERR's real cause)."""
    probe = path.parent / ".covey-space-probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\0" * 65536)
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError as err:
        return err.errno in _FULL_ERRNOS
    return False


def _statements(script: str) -> Iterator[str]:
    """Split a migration script into complete statements (triggers contain ';')."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        if line.lstrip().startswith("--"):
            continue
        buffer += line
        if sqlite.complete_statement(buffer):
            statement = buffer.strip()
            buffer = ""
            if statement:
                yield statement
    if buffer.strip():
        yield buffer.strip()
