"""Compaction keeps the store within its limit without inventing anything."""

from __future__ import annotations

from covey.device import Pod
from covey.device.store._compaction import compact, extractive_summary


def _conversation(pod: Pod, session: str, lines: list[str]) -> None:
    with pod.store.transaction() as c:
        cur = c.execute("INSERT INTO conversations (session_id, started_at) VALUES (?, 't')",
                        (session,))
        for line in lines:
            c.execute("INSERT INTO messages (conversation_id, role, content, created_at)"
                      " VALUES (?, 'user', ?, 't')", (cur.lastrowid, line))
            c.execute("INSERT INTO messages (conversation_id, role, content, created_at)"
                      " VALUES (?, 'assistant', 'ok!', 't')", (cur.lastrowid,))


def test_extractive_summary_uses_only_the_users_sentences() -> None:
    texts = ["ok haha", "We adopted a greyhound called Pixel last spring.", "lol ok",
             "The marathon in Porto starts at seven tomorrow.", "yes yes ok sure thing"]
    summary = extractive_summary(texts, max_sentences=2)
    assert "greyhound" in summary and "marathon" in summary
    assert all(sentence in " ".join(texts) for sentence in summary.split(". ") if sentence)


def test_compaction_bounds_the_history(pod: Pod) -> None:
    for n in range(6):
        _conversation(pod, f"s{n}", [f"On day {n} we visited the old lighthouse near town.",
                                     "ok", f"My cousin number {n} sent a long letter today."])
    assert pod.store.query("SELECT count(*) FROM messages")[0][0] == 36
    report = compact(pod, max_messages=20, keep_recent=12)
    remaining = pod.store.query("SELECT count(*) FROM messages")[0][0]
    assert remaining <= 20
    assert report.erased_messages == 36 - remaining
    summaries = pod.memories.all(kind="summary")
    assert len(summaries) == report.summarized_conversations >= 3
    assert "lighthouse" in summaries[-1].text
    assert pod.export()["audit_log"][-1]["kind"] == "compaction"
    again = compact(pod, max_messages=20, keep_recent=12)
    assert again.erased_messages == 0
