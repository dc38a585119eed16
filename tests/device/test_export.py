"""Export (the right of access) and restore: round trips, checked with Hypothesis."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from covey.device import MEMORY_KINDS, Pod
from covey.device.federation._budget import pod_ledger
from covey.errors import InvalidInputError
from covey.privacy import Release
from tests.conftest import FAST_CONFIG, PASSPHRASE

memory_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    min_size=1, max_size=300,
).filter(lambda s: s.strip() != "")
memories = st.lists(st.tuples(memory_text, st.sampled_from(MEMORY_KINDS)), max_size=12)


def _user_data(document: dict) -> dict:
    return document["tables"]


def _fill(pod: Pod, items: list[tuple[str, str]]) -> None:
    for text, kind in items:
        pod.memories.add(text, kind=kind)
    with pod.store.transaction() as c:
        c.execute("INSERT INTO conversations (session_id, started_at) VALUES ('s1', 't0')")
        c.execute("INSERT INTO messages (conversation_id, role, content, created_at)"
                  " VALUES (1, 'user', 'hello there', 't1')")
        c.execute("INSERT INTO feedback (message_id, rating, created_at) VALUES (1, 1, 't2')")
        c.execute("UPDATE memories SET embedding = ? WHERE id = 1", (b"\x00\x01\xff" * 4,))
    pod_ledger(pod).spend(Release("federated_update", "run", 1, "central", 1.0, 1.0, 1.0, 0.5,
                                  3, 3, 1e-6))


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=memories)
def test_export_round_trips(tmp_path_factory: pytest.TempPathFactory,
                            items: list[tuple[str, str]]) -> None:
    base = tmp_path_factory.mktemp("rt")
    with Pod.create(base / "a", PASSPHRASE, config=FAST_CONFIG) as pod:
        _fill(pod, items)
        out = base / "export.json"
        pod.write_export(out)
        first = json.loads(out.read_text(encoding="utf-8"))
    exported = [(m["text"], m["kind"]) for m in first["tables"]["memories"]]
    assert exported == [(t.strip(), k) for t, k in items]
    with Pod.create(base / "b", PASSPHRASE, config=FAST_CONFIG) as twin:
        twin.restore(first)
        second = twin.export()
        # What the user owns is identical; the copy keeps its own identity and audit log.
        assert _user_data(second) == _user_data(first)
        assert second["pod"]["device_id"] != first["pod"]["device_id"]
        assert second["audit_log"][-1]["kind"] == "import"
        for text, _ in items[:3]:
            if any(ch.isalnum() for ch in text):
                assert twin.memories.search(text), "restored memories are searchable"


def test_export_file_is_private_and_audited(pod: Pod, tmp_path: Path) -> None:
    size = pod.write_export(tmp_path / "out" / "export.json")
    path = tmp_path / "out" / "export.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.stat().st_size == size
    last = pod.export()["audit_log"][-1]
    assert (last["kind"], last["bytes"]) == ("export", size)
    assert "private_key" not in path.read_text()


@pytest.mark.parametrize("document", [
    {}, {"format": "other"}, {"format": "covey-export-1"},
    {"format": "covey-export-1", "tables": {"memories": [{"nope": 1}]}},
    {"format": "covey-export-1", "tables": {"memories": [{"text": "x", "kind": "bad",
                                                           "created_at": "t", "updated_at": "t"}]}},
])
def test_restore_rejects_bad_documents(pod: Pod, document: dict) -> None:
    with pytest.raises(InvalidInputError):
        pod.restore(document)
    assert pod.memories.count() == 0


def test_restore_needs_empty_pod(pod: Pod) -> None:
    pod.memories.add("already here")
    with pytest.raises(InvalidInputError, match="empty"):
        pod.restore(pod.export())


def test_init_from_export_cli(pod: Pod, covey, tmp_path: Path) -> None:
    pod.memories.add("carried to the new phone", kind="fact")
    pod.write_export(tmp_path / "e.json")
    pod.close()
    new_home = tmp_path / "new"
    result = covey("pod", "init", "--home", str(new_home), "--from-export",
                   str(tmp_path / "e.json"), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["restored"]["memories"] == 1
    listed = covey("memory", "list", "--home", str(new_home), "--json")
    assert json.loads(listed.stdout)[0]["text"] == "carried to the new phone"
    bad = covey("pod", "init", "--home", str(tmp_path / "other"), "--from-export",
                str(tmp_path / "missing.json"))
    assert bad.returncode == 2 and not (tmp_path / "other" / "pod.key").exists()
