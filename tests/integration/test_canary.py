"""A canary sentence written through the CLI never appears in plaintext on disk."""

from __future__ import annotations

import json
import secrets
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import Covey, cli_env

pytestmark = pytest.mark.integration


def _files_containing(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits += [f"{path}: {n!r}" for n in needles if n in data]
    return hits


def test_canary_is_nowhere_in_plaintext(covey: Covey, tmp_path: Path) -> None:
    home = tmp_path / "pod"
    tmpdir = tmp_path / "tmp"  # the subprocesses' TMPDIR (see cli_env)
    canary = f"The falcon {secrets.token_hex(6)} nests above the quiet harbour"
    words = canary.split()
    needles = [canary.encode(), canary.encode("utf-16-le"), words[2].encode()]
    h = ("--home", str(home))
    assert covey("pod", "init", *h).returncode == 0
    for step in (
        ("memory", "add", canary, "--kind", "fact", *h),
        ("memory", "add", "an unrelated note", *h),
        ("memory", "search", words[2], *h),
        ("memory", "list", *h),
        ("pod", "status", *h),
        ("memory", "add", canary + " " + "x" * 9000, *h),  # refused: too long
        ("memory", "search", canary, *h, "--json"),
    ):
        result = covey(*step)
        assert canary not in result.stderr
    listed = covey("memory", "list", "--json", *h)
    assert canary in listed.stdout  # the probe works: the pod does hold it
    wrong = covey("memory", "list", *h, env=cli_env(tmp_path, COVEY_PASSPHRASE="wrong one!"))
    assert wrong.returncode == 4 and canary not in wrong.stderr

    assert (home / "logs" / "covey.log").stat().st_size > 0, "the log is being written"
    assert _files_containing(home, needles) == []
    assert _files_containing(tmpdir, needles) == []
    with pytest.raises(sqlite3.DatabaseError):
        sqlite3.connect(home / "pod.db").execute("SELECT * FROM sqlite_master").fetchall()

    # Forgetting the memory and shredding the pod leave nothing either.
    fact = next(m for m in json.loads(listed.stdout) if m["kind"] == "fact")
    assert covey("memory", "forget", str(fact["id"]), *h).returncode == 0
    assert covey("pod", "forget", "--all", "--yes", *h).returncode == 0
    assert _files_containing(tmp_path, needles) == []
