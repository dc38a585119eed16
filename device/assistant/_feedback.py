"""Feedback on replies, and the training examples it yields.

A thumbs-up makes the reply an *accepted* example; a correction makes the user's text
the target of a *correction* example; a thumbs-down is stored and yields nothing. Each
example carries the user's consent to federated training as it stood when the example
was made; a federated round uses only consented ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlcipher3.dbapi2 as sqlite

from covey._time import utc_timestamp
from covey.device._pod import Pod
from covey.errors import InvalidInputError

__all__ = ["TRAINING_CONSENT", "FeedbackResult", "give_feedback"]

TRAINING_CONSENT = "federated_training"
MAX_CORRECTION_CHARS = 4000


@dataclass(frozen=True)
class FeedbackResult:
    """What a piece of feedback was attached to and produced."""

    feedback_id: int
    message_id: int
    example_id: int | None
    consented: bool



def consented(pod: Pod, scope: str = TRAINING_CONSENT) -> bool:
    """Whether the user currently grants ``scope``."""
    rows = pod.store.query("SELECT granted FROM consents WHERE scope = ?", (scope,))
    return bool(rows and rows[0][0])


def write_consent(conn: sqlite.Connection, scope: str, granted: bool) -> None:
    """Record a consent inside the caller's transaction (not audited here)."""
    conn.execute("INSERT INTO consents (scope, granted, updated_at) VALUES (?, ?, ?)"
                 " ON CONFLICT (scope) DO UPDATE SET granted = excluded.granted,"
                 " updated_at = excluded.updated_at", (scope, int(granted), utc_timestamp()))


def set_consent(pod: Pod, scope: str, granted: bool) -> None:
    """Grant or revoke a consent (audited)."""
    with pod.store.transaction() as c:
        write_consent(c, scope, granted)
        from covey.device.store import _audit

        _audit.append(c, "consent", detail={"scope": scope, "granted": granted})


def give_feedback(pod: Pod, rating: int | None = None, correction: str | None = None,
                  message_id: int | None = None) -> FeedbackResult:
    """Attach a rating (+1 / -1) or a correction to a reply (default: the last one).

    Raises:
        InvalidInputError: neither or both given, no such reply, or an empty correction.
    """
    if (rating is None) == (correction is None):
        raise InvalidInputError("give exactly one of --up, --down or --correct TEXT")
    if rating is not None and rating not in (-1, 1):
        raise InvalidInputError("a rating is +1 or -1")
    if correction is not None:
        correction = correction.strip()
        if not correction or len(correction) > MAX_CORRECTION_CHARS:
            raise InvalidInputError(
                f"a correction needs 1 to {MAX_CORRECTION_CHARS} characters")
    found = pod.conversations.reply(message_id)
    if found is None:
        raise InvalidInputError("there is no reply to give feedback on"
                                if message_id is None else f"no reply #{message_id}")
    reply_id, reply = found.id, found.text
    prompt = pod.conversations.prompt_of(found)
    consent = consented(pod)
    example_id = None
    with pod.store.transaction() as c:
        cur = c.execute("INSERT INTO feedback (message_id, rating, correction, created_at)"
                        " VALUES (?, ?, ?, ?)", (reply_id, rating, correction, utc_timestamp()))
        feedback_id = int(cur.lastrowid or 0)
        target, source = ((reply, "accepted") if rating == 1 else
                          (correction, "correction") if correction else (None, None))
        if target and prompt:
            cur = c.execute(
                "INSERT INTO training_examples (prompt, target, source, feedback_id, consented,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (prompt, target, source, feedback_id, int(consent), utc_timestamp()))
            example_id = int(cur.lastrowid or 0)
    return FeedbackResult(feedback_id, reply_id, example_id, consent)
