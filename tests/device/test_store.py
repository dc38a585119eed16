"""The SQLCipher store: pragmas, migrations, and that only the data key opens it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from covey.device import Pod
from covey.device.store._keys import new_data_key
from covey.device.store._schema import SCHEMA_VERSION
from covey.device.store._store import Store
from covey.errors import StoreCorruptError


def test_pragmas(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db", new_data_key())
    q = store.query
    assert q("PRAGMA journal_mode")[0][0] == "wal"
    assert q("PRAGMA synchronous")[0][0] == 2  # FULL
    assert q("PRAGMA secure_delete")[0][0] == 1
    assert q("PRAGMA foreign_keys")[0][0] == 1
    assert q("PRAGMA temp_store")[0][0] == 2  # MEMORY
    assert q("PRAGMA busy_timeout")[0][0] == 10_000
    assert store.schema_version == SCHEMA_VERSION
    assert (tmp_path / "s.db").stat().st_mode & 0o777 == 0o600
    store.close()


def test_migrations_are_idempotent(tmp_path: Path) -> None:
    key = new_data_key()
    Store(tmp_path / "s.db", key).close()
    again = Store(tmp_path / "s.db", key)
    assert again.schema_version == SCHEMA_VERSION
    again.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    key = new_data_key()
    store = Store(tmp_path / "s.db", key)
    store.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    store.close()
    with pytest.raises(StoreCorruptError, match="newer than this covey"):
        Store(tmp_path / "s.db", key)


def test_plain_sqlite_cannot_read_a_pod(pod: Pod) -> None:
    pod.memories.add("plain sqlite must not see this")
    conn = sqlite3.connect(pod.store.path)
    with pytest.raises(sqlite3.DatabaseError, match="not a database"):
        conn.execute("SELECT * FROM sqlite_master").fetchall()
    conn.close()


def test_another_key_cannot_read(tmp_path: Path) -> None:
    Store(tmp_path / "s.db", new_data_key()).close()
    with pytest.raises(StoreCorruptError):
        Store(tmp_path / "s.db", new_data_key())
