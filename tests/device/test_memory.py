"""Memories: add, list, keyword search, and erasure that reaches the file pages."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from covey.device import Pod
from covey.device.memory._memory import Memories, fts_query
from covey.device.store._store import Store
from covey.errors import InvalidInputError


def test_add_list_search(pod: Pod) -> None:
    a = pod.memories.add("My sister Ana lives in Lisbon", kind="fact")
    b = pod.memories.add("I prefer vegetarian food", kind="preference")
    pod.memories.add("Dentist on Friday")
    assert [m.id for m in pod.memories.all()] == [3, b.id, a.id]
    assert [m.id for m in pod.memories.all(kind="preference")] == [b.id]
    assert len(pod.memories.all(limit=2)) == 2
    hits = pod.memories.search("where does my sister live?")
    assert hits[0].memory.id == a.id
    assert hits[0].score > 0
    assert pod.memories.search("vegetárian")[0].memory.id == b.id  # diacritics folded
    assert pod.memories.search("?!") == []
    assert pod.memories.search("zebra") == []


@pytest.mark.parametrize(
    "query", ['"', "NEAR(a b)", "a AND", "*", "col:x", "'; DROP TABLE memories"])
def test_search_syntax_is_never_an_error(pod: Pod, query: str) -> None:
    pod.memories.add("a b c drop table")
    pod.memories.search(query)


def test_fts_query_quotes_words() -> None:
    assert fts_query('say "hi" NEAR me') == '"say" OR """hi""" OR "NEAR" OR "me"'
    assert fts_query("... ?") is None


def test_bad_input(pod: Pod) -> None:
    with pytest.raises(InvalidInputError):
        pod.memories.add("   ")
    with pytest.raises(InvalidInputError):
        pod.memories.add("x", kind="rumour")
    with pytest.raises(InvalidInputError):
        pod.memories.add("x" * 10_000)
    assert pod.memories.count() == 0


def test_forget(pod: Pod) -> None:
    kept = pod.memories.add("the green door")
    gone = pod.memories.add("the purple door")
    assert pod.memories.forget(gone.id)
    assert not pod.memories.forget(gone.id)
    assert pod.memories.get(gone.id) is None
    assert [h.memory.id for h in pod.memories.search("purple door")] == [kept.id]
    # The index itself holds no trace of the erased words.
    rows = pod.store.query("SELECT rowid FROM memories_fts WHERE memories_fts MATCH 'purple'")
    assert rows == []
    kinds = [e["kind"] for e in pod.export()["audit_log"]]
    assert kinds[-1] == "erasure"


def test_erased_text_is_gone_from_the_file_pages(tmp_path: Path) -> None:
    """Run the same store code unencrypted, so the raw bytes can be searched.

    With encryption the canary could never be seen in the file anyway; this checks that
    erasure itself (secure_delete, FTS5 secure-delete, WAL truncation) leaves nothing
    for someone who later obtains the key.
    """
    store = Store(tmp_path / "plain.db", key=None)
    memories = Memories(store, on_erase=store.checkpoint)
    canary = "canary-" + secrets.token_hex(8)
    for i in range(300):
        memories.add(f"ordinary memory {i} about gardening and the weather")
    target = memories.add(f"the secret word is {canary} indeed")
    for i in range(300):
        memories.add(f"later memory {i} about cooking")
    store.checkpoint()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert canary.encode() in raw  # the probe works: the word is there before erasure
    assert memories.forget(target.id)
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert canary.encode() not in raw
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert canary.encode() not in raw


def test_common_words_do_not_drive_keyword_search(pod: Pod) -> None:
    for i in range(300):
        pod.memories.add(f"the note number {i} about the weather")
    target = pod.memories.add("the sister lives by the harbour")
    hits = pod.memories.search("the sister")
    assert [h.memory.id for h in hits] == [target.id]
    assert pod.memories.search("the the") == []  # only common words: nothing specific to find


def test_semantic_recall_follows_other_writers_and_rollbacks(tmp_path: Path) -> None:
    """The in-memory vector index follows the file: another connection's writes and
    erasures are seen at the next recall, and a rolled-back write is never recalled."""
    from covey.models import create_embedder

    embedder = create_embedder("minilm-onnx")
    ours_store, theirs_store = (Store(tmp_path / "m.db", key=None) for _ in range(2))
    ours = Memories(ours_store, on_erase=lambda: None, embedder=embedder)
    theirs = Memories(theirs_store, on_erase=lambda: None, embedder=embedder)
    try:
        ours.add("I play the cello on Sundays")
        assert [h.memory.text for h in ours.recall("what instrument do I play?", 1)] == [
            "I play the cello on Sundays"]
        boat = theirs.add("My boat is moored in Porto")
        hits = ours.recall("where is my boat kept?", 1)
        assert [h.memory.id for h in hits] == [boat.id]
        assert theirs.forget(boat.id)
        assert all(h.memory.id != boat.id for h in ours.recall("where is my boat kept?", 3))
        with pytest.raises(RuntimeError), ours_store.transaction() as c:
            ours.insert(c, "My passport expires in March", "fact", {"source": "manual"})
            raise RuntimeError("the caller fails after the insert")
        theirs.add("I like green tea")  # another write, which may reuse the freed row id
        assert ours.recall("when does my passport expire?", 3) == []
        assert [h.memory.text for h in ours.recall("which tea do I like?", 1)] == [
            "I like green tea"]
    finally:
        ours_store.close()
        theirs_store.close()
