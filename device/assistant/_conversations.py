"""The pod's conversations: sessions and the messages said in them.

Every statement on the ``conversations`` and ``messages`` tables is here. Writes that
belong to a larger change (a message and what was learned from it, a reply and the use
of its memories) take the caller's transaction, as :class:`Memories` does.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

import sqlcipher3.dbapi2 as sqlite

from covey._time import utc_timestamp
from covey.device.store._store import Store
from covey.errors import InvalidInputError

__all__ = ["Conversations", "Reply"]



@dataclass(frozen=True)
class Reply:
    """An assistant's reply as stored: its text and why it was given."""

    id: int
    conversation_id: int
    text: str
    explanation: dict[str, Any]


class Conversations:
    """Sessions and their messages in the pod's encrypted database."""

    def __init__(self, store: Store) -> None:
        self._store = store

    # -- sessions ----------------------------------------------------------------------

    def start(self, session_id: str | None = None) -> str:
        """Start a session (a new id unless ``session_id`` is given); returns its id."""
        session_id = session_id or "s-" + secrets.token_hex(6)
        with self._store.transaction() as c:
            c.execute("INSERT INTO conversations (session_id, started_at) VALUES (?, ?)",
                      (session_id, utc_timestamp()))
        return session_id

    def exists(self, session_id: str) -> bool:
        """Whether a session of that id was started."""
        return bool(self._store.query("SELECT 1 FROM conversations WHERE session_id = ?",
                                      (session_id,)))

    def last_session(self) -> str | None:
        """The most recent session, if any."""
        rows = self._store.query("SELECT session_id FROM conversations ORDER BY id DESC LIMIT 1")
        return str(rows[0][0]) if rows else None

    def conversation_id(self, session_id: str) -> int:
        """The conversation row of a session.

        Raises:
            InvalidInputError: no such session.
        """
        rows = self._store.query("SELECT id FROM conversations WHERE session_id = ?",
                                 (session_id,))
        if not rows:
            raise InvalidInputError(f"no session {session_id}")
        return int(rows[0][0])

    # -- messages ----------------------------------------------------------------------

    def add_user_message(self, conn: sqlite.Connection, conversation_id: int, text: str) -> int:
        """Store a user's message inside the caller's transaction; returns its id."""
        cur = conn.execute("INSERT INTO messages (conversation_id, role, content, created_at)"
                           " VALUES (?, 'user', ?, ?)", (conversation_id, text, utc_timestamp()))
        return int(cur.lastrowid or 0)

    def add_reply(self, conn: sqlite.Connection, conversation_id: int, text: str,
                  model_version: str, explanation: dict[str, Any]) -> int:
        """Store an assistant's reply inside the caller's transaction; returns its id."""
        cur = conn.execute(
            "INSERT INTO messages (conversation_id, role, content, model_version,"
            " created_at, explanation) VALUES (?, 'assistant', ?, ?, ?, ?)",
            (conversation_id, text, model_version, utc_timestamp(), json.dumps(explanation)))
        return int(cur.lastrowid or 0)

    def recent_turns(self, limit: int) -> list[tuple[str, str]]:
        """The latest (role, text) turns across sessions, newest first."""
        rows = self._store.query(
            "SELECT role, content FROM messages WHERE role IN ('user', 'assistant')"
            " ORDER BY id DESC LIMIT ?", (limit,))
        return [(r[0], r[1]) for r in rows]

    def reply(self, message_id: int | None = None) -> Reply | None:
        """A reply by id (default: the last one), if there is one."""
        where = " AND id = ?" if message_id is not None else ""
        sql = ("SELECT id, conversation_id, content, explanation FROM messages"  # noqa: S608
               f" WHERE role = 'assistant'{where} ORDER BY id DESC LIMIT 1")
        rows = self._store.query(sql, (message_id,) if message_id is not None else ())
        if not rows:
            return None
        row = rows[0]
        return Reply(int(row["id"]), int(row["conversation_id"]), str(row["content"]),
                     json.loads(row["explanation"] or "{}"))

    def prompt_of(self, reply: Reply) -> str:
        """The user's message a reply answered ("" if none is left)."""
        rows = self._store.query(
            "SELECT content FROM messages WHERE conversation_id = ? AND role = 'user'"
            " AND id < ? ORDER BY id DESC LIMIT 1", (reply.conversation_id, reply.id))
        return str(rows[0][0]) if rows else ""

    def last_user_message(self) -> int | None:
        """The id of the user's last message, if any."""
        rows = self._store.query(
            "SELECT id FROM messages WHERE role = 'user' ORDER BY id DESC LIMIT 1")
        return int(rows[0][0]) if rows else None

    def erase_from(self, conn: sqlite.Connection, message_id: int) -> int:
        """Erase a message and every later one, in the caller's transaction; returns
        how many were erased."""
        return int(conn.execute("DELETE FROM messages WHERE id >= ?", (message_id,)).rowcount)

    # -- compaction --------------------------------------------------------------------

    def count(self) -> int:
        """How many messages are stored."""
        return int(self._store.query("SELECT count(*) FROM messages")[0][0])

    def cutoff(self, keep_recent: int) -> int:
        """The id of the newest message that is not among the ``keep_recent`` newest
        (0 if there is none)."""
        rows = self._store.query("SELECT id FROM messages ORDER BY id DESC LIMIT 1 OFFSET ?",
                                 (keep_recent,))
        return int(rows[0][0]) if rows else 0

    def conversations_up_to(self, message_id: int) -> list[int]:
        """The conversations holding a message at or before ``message_id``, oldest first."""
        rows = self._store.query(
            "SELECT DISTINCT conversation_id FROM messages WHERE id <= ? ORDER BY 1",
            (message_id,))
        return [int(r[0]) for r in rows]

    def user_texts(self, conversation_id: int, up_to: int) -> list[str]:
        """The user's messages in a conversation, up to ``up_to``, in order."""
        rows = self._store.query(
            "SELECT content FROM messages WHERE conversation_id = ? AND role = 'user'"
            " AND id <= ? ORDER BY id", (conversation_id, up_to))
        return [str(r[0]) for r in rows]

    def erase_up_to(self, conn: sqlite.Connection, conversation_id: int, up_to: int) -> int:
        """Erase a conversation's messages up to ``up_to``, in the caller's transaction;
        returns how many were erased."""
        return int(conn.execute("DELETE FROM messages WHERE conversation_id = ? AND id <= ?",
                                (conversation_id, up_to)).rowcount)
