"""The pod store's schema, as an ordered list of migrations.

``PRAGMA user_version`` holds the number of migrations applied. A migration is never
edited once released: a change is a new entry at the end. Each runs in the same
transaction as the ``user_version`` bump, so a crash leaves the old or the new schema.
"""

from __future__ import annotations

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "USER_TABLES"]

_V1 = """
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;

-- The device's Ed25519 identity; exactly one row.
CREATE TABLE identity (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    device_id   TEXT NOT NULL,
    private_key BLOB NOT NULL,
    public_key  BLOB NOT NULL,
    created_at  TEXT NOT NULL
) STRICT;

CREATE TABLE conversations (
    id         INTEGER PRIMARY KEY,
    session_id TEXT NOT NULL,
    title      TEXT,
    started_at TEXT NOT NULL
) STRICT;
CREATE INDEX conversations_session ON conversations (session_id);

CREATE TABLE messages (
    id              INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    role            TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content         TEXT NOT NULL,
    model_version   TEXT,
    created_at      TEXT NOT NULL
) STRICT;
CREATE INDEX messages_conversation ON messages (conversation_id, id);

CREATE TABLE memories (
    id              INTEGER PRIMARY KEY,
    text            TEXT NOT NULL,
    kind            TEXT NOT NULL
                    CHECK (kind IN ('fact', 'preference', 'episode', 'summary', 'note')),
    embedding       BLOB,
    embedding_model TEXT,
    provenance      TEXT NOT NULL DEFAULT '{}',
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    last_used_at    TEXT,
    use_count       INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE INDEX memories_kind ON memories (kind, created_at);

-- Keyword index over memories. External content: the text is stored once, in memories.
CREATE VIRTUAL TABLE memories_fts USING fts5 (
    text, content = 'memories', content_rowid = 'id', tokenize = 'unicode61 remove_diacritics 2'
);
-- Deleted tokens are removed from the index at once rather than at the next merge.
INSERT INTO memories_fts (memories_fts, rank) VALUES ('secure-delete', 1);
CREATE TRIGGER memories_ai AFTER INSERT ON memories BEGIN
    INSERT INTO memories_fts (rowid, text) VALUES (new.id, new.text);
END;
CREATE TRIGGER memories_ad AFTER DELETE ON memories BEGIN
    INSERT INTO memories_fts (memories_fts, rowid, text) VALUES ('delete', old.id, old.text);
END;
CREATE TRIGGER memories_au AFTER UPDATE OF text ON memories BEGIN
    INSERT INTO memories_fts (memories_fts, rowid, text) VALUES ('delete', old.id, old.text);
    INSERT INTO memories_fts (rowid, text) VALUES (new.id, new.text);
END;

CREATE TABLE context_events (
    id         INTEGER PRIMARY KEY,
    source     TEXT NOT NULL,
    kind       TEXT NOT NULL,
    value      TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT
) STRICT;
CREATE INDEX context_events_expiry ON context_events (expires_at);

CREATE TABLE feedback (
    id         INTEGER PRIMARY KEY,
    message_id INTEGER REFERENCES messages (id) ON DELETE SET NULL,
    rating     INTEGER CHECK (rating IN (-1, 1)),
    correction TEXT,
    created_at TEXT NOT NULL
) STRICT;

CREATE TABLE training_examples (
    id          INTEGER PRIMARY KEY,
    prompt      TEXT NOT NULL,
    target      TEXT NOT NULL,
    source      TEXT NOT NULL CHECK (source IN ('accepted', 'correction', 'imported')),
    feedback_id INTEGER REFERENCES feedback (id) ON DELETE SET NULL,
    consented   INTEGER NOT NULL DEFAULT 0 CHECK (consented IN (0, 1)),
    created_at  TEXT NOT NULL
) STRICT;

-- The preference graph: entities and the user's relations to them.
CREATE TABLE graph_nodes (
    id         INTEGER PRIMARY KEY,
    kind       TEXT NOT NULL,
    label      TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    UNIQUE (kind, label)
) STRICT;

CREATE TABLE graph_edges (
    id            INTEGER PRIMARY KEY,
    src           INTEGER NOT NULL REFERENCES graph_nodes (id) ON DELETE CASCADE,
    dst           INTEGER NOT NULL REFERENCES graph_nodes (id) ON DELETE CASCADE,
    relation      TEXT NOT NULL,
    weight        REAL NOT NULL DEFAULT 1.0,
    provenance    TEXT NOT NULL DEFAULT '{}',
    created_at    TEXT NOT NULL,
    superseded_at TEXT
) STRICT;
CREATE INDEX graph_edges_src ON graph_edges (src, relation);

CREATE TABLE consents (
    scope      TEXT PRIMARY KEY,
    granted    INTEGER NOT NULL CHECK (granted IN (0, 1)),
    updated_at TEXT NOT NULL
) STRICT;

-- The privacy ledger: one row per release of user-derived information.
CREATE TABLE ledger (
    id               INTEGER PRIMARY KEY,
    run_id           TEXT NOT NULL,
    round            INTEGER NOT NULL,
    mode             TEXT NOT NULL,
    mechanism        TEXT NOT NULL,
    accountant       TEXT NOT NULL,
    epsilon          REAL NOT NULL CHECK (epsilon >= 0),
    delta            REAL NOT NULL CHECK (delta >= 0 AND delta < 1),
    noise_multiplier REAL,
    clip_norm        REAL,
    sample_rate      REAL,
    created_at       TEXT NOT NULL
) STRICT;

CREATE TABLE model_versions (
    id         TEXT PRIMARY KEY,
    parent     TEXT,
    round      INTEGER,
    sha256     TEXT NOT NULL,
    signature  BLOB,
    metrics    TEXT NOT NULL DEFAULT '{}',
    active     INTEGER NOT NULL DEFAULT 0 CHECK (active IN (0, 1)),
    created_at TEXT NOT NULL
) STRICT;

-- Append-only: each row carries the hash of the row before it.
CREATE TABLE audit_log (
    seq        INTEGER PRIMARY KEY,
    created_at TEXT NOT NULL,
    kind       TEXT NOT NULL,
    peer       TEXT NOT NULL DEFAULT '',
    bytes      INTEGER NOT NULL DEFAULT 0,
    epsilon    REAL NOT NULL DEFAULT 0,
    detail     TEXT NOT NULL DEFAULT '{}',
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL
) STRICT;
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log BEGIN
    SELECT RAISE (ABORT, 'audit_log is append-only');
END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log BEGIN
    SELECT RAISE (ABORT, 'audit_log is append-only');
END;
"""

# v2: why each reply was given (the orchestrator's explanation, JSON), kept with the reply.
_V2 = """
ALTER TABLE messages ADD COLUMN explanation TEXT;
"""

# v3: a ledger row says how many Gaussian releases it charges (the whole planned run at
# the first participation in a central-mode run, one per participation in local mode),
# and which model version the update was computed from.
_V3 = """
ALTER TABLE ledger ADD COLUMN rounds INTEGER NOT NULL DEFAULT 1 CHECK (rounds >= 0);
ALTER TABLE ledger ADD COLUMN model_version TEXT;
"""

# v4: sync between the pods of one user. The replicated state (entries with their hybrid
# logical timestamps, tombstones included), the version vector, and the user key that
# certifies the user's devices (held by every paired pod, inside the encrypted store).
_V4 = """
CREATE TABLE sync_entries (
    collection TEXT NOT NULL,
    key        TEXT NOT NULL,
    value      TEXT,
    stamp      TEXT NOT NULL,
    deleted    INTEGER NOT NULL CHECK (deleted IN (0, 1)),
    PRIMARY KEY (collection, key)
) STRICT;
CREATE TABLE sync_vector (
    node  TEXT PRIMARY KEY,
    stamp TEXT NOT NULL
) STRICT;
CREATE TABLE user_identity (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    user_id     TEXT NOT NULL,
    private_key BLOB NOT NULL,
    created_at  TEXT NOT NULL
) STRICT;
"""

# v5: context sources. Each is off until the user enables it on this device (with a
# consent record); its retention, its settings (an MQTT broker's address, topics and
# credentials, inside the encrypted store) and what it captured and rejected.
_V5 = """
CREATE TABLE context_sources (
    name        TEXT PRIMARY KEY,
    enabled     INTEGER NOT NULL CHECK (enabled IN (0, 1)),
    retention_s INTEGER NOT NULL CHECK (retention_s > 0),
    settings    TEXT NOT NULL DEFAULT '{}',
    captured    INTEGER NOT NULL DEFAULT 0,
    rejected    INTEGER NOT NULL DEFAULT 0,
    updated_at  TEXT NOT NULL
) STRICT;
CREATE INDEX context_events_source ON context_events (source, kind, created_at);
"""

# v6: a stamp that changes with every write to the memories' embeddings, so that a
# process keeps its in-memory vector index in step with other processes' writes by
# reading one row, not by scanning the table (a scan reads every embedding: 0.65 s at
# 100k memories; the same scan found memories without an embedding, now a partial
# index). A random stamp, not a counter: a rolled-back write of this process
# followed by another process's write never looks like "nothing changed".
_V6 = """
CREATE TABLE memories_stamp (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    stamp INTEGER NOT NULL
) STRICT;
INSERT INTO memories_stamp (id, stamp) VALUES (1, 0);
-- Memories awaiting an embedding, found without reading every row.
CREATE INDEX memories_unembedded ON memories (id) WHERE embedding IS NULL;
CREATE TRIGGER memories_stamp_ai AFTER INSERT ON memories BEGIN
    UPDATE memories_stamp SET stamp = random() WHERE id = 1;
END;
CREATE TRIGGER memories_stamp_ad AFTER DELETE ON memories BEGIN
    UPDATE memories_stamp SET stamp = random() WHERE id = 1;
END;
CREATE TRIGGER memories_stamp_au AFTER UPDATE OF embedding, embedding_model ON memories BEGIN
    UPDATE memories_stamp SET stamp = random() WHERE id = 1;
END;
"""

# v7: the privacy ledger as signed, hash-chained entries per device (this device's and,
# through sync or a restored export, the user's other devices'), append-only, with the
# public keys other devices' entries verify against. The v6 table keeps its rows under a
# new name until the pod converts them into signed entries of its own chain (it needs the
# device key, which SQL does not have); then it stays empty.
_V7 = """
CREATE TABLE privacy_ledger (
    device_id  TEXT NOT NULL,
    seq        INTEGER NOT NULL CHECK (seq >= 1),
    created_at TEXT NOT NULL,
    body       TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL,
    signature  BLOB NOT NULL,
    PRIMARY KEY (device_id, seq)
) STRICT;
CREATE TRIGGER privacy_ledger_no_update BEFORE UPDATE ON privacy_ledger BEGIN
    SELECT RAISE (ABORT, 'the privacy ledger is append-only');
END;
CREATE TRIGGER privacy_ledger_no_delete BEFORE DELETE ON privacy_ledger BEGIN
    SELECT RAISE (ABORT, 'the privacy ledger is append-only');
END;
CREATE TABLE ledger_keys (
    device_id  TEXT PRIMARY KEY,
    public_key BLOB NOT NULL
) STRICT;
ALTER TABLE ledger RENAME TO ledger_v6;
"""

# v8: sync protocol 2. Every replicated entry carries its writer's device signature, and
# certificates and revocations took a new form (the user key chain), so state synced
# under protocol 1 cannot be checked: it is dropped. The pod's own tables keep every
# value and publish it again; pods paired under protocol 1 pair again.
_V8 = """
ALTER TABLE sync_entries ADD COLUMN signature TEXT NOT NULL DEFAULT '';
DELETE FROM sync_entries;
DELETE FROM sync_vector;
DELETE FROM user_identity;
"""

# v9: a second entry that another pod of the user hands over for a (device, number)
# already held is kept beside the first, not dropped: a device that spent again after its
# store was put back to an earlier copy shows as a fork, and both branches count.
_V9 = """
CREATE TABLE ledger_forks (
    device_id  TEXT NOT NULL,
    seq        INTEGER NOT NULL CHECK (seq >= 1),
    created_at TEXT NOT NULL,
    body       TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL,
    signature  BLOB NOT NULL,
    PRIMARY KEY (device_id, hash)
) STRICT;
CREATE TRIGGER ledger_forks_no_update BEFORE UPDATE ON ledger_forks BEGIN
    SELECT RAISE (ABORT, 'the privacy ledger is append-only');
END;
CREATE TRIGGER ledger_forks_no_delete BEFORE DELETE ON ledger_forks BEGIN
    SELECT RAISE (ABORT, 'the privacy ledger is append-only');
END;
"""

MIGRATIONS: tuple[str, ...] = (_V1, _V2, _V3, _V4, _V5, _V6, _V7, _V8, _V9)
SCHEMA_VERSION = len(MIGRATIONS)

# Tables holding the user's data, in an order that satisfies foreign keys on insert.
USER_TABLES: tuple[str, ...] = (
    "conversations",
    "messages",
    "memories",
    "context_events",
    "feedback",
    "training_examples",
    "graph_nodes",
    "graph_edges",
    "consents",
    "privacy_ledger",
    "model_versions",
    "sync_entries",
    "context_sources",
)
