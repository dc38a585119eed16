"""The command line as a user meets it: one-line errors, exit codes, --json."""

from __future__ import annotations

import json
from pathlib import Path

import covey as covey_package
from tests.conftest import Covey, cli_env


def _one_line_error(result, code: int) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


def test_version(covey: Covey) -> None:
    result = covey("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"covey {covey_package.__version__}"


def test_init_status_and_json(covey: Covey, home: Path) -> None:
    created = covey("pod", "init", "--home", str(home), "--name", "kitchen", "--json")
    assert created.returncode == 0, created.stderr
    info = json.loads(created.stdout)
    assert info["name"] == "kitchen"
    status = json.loads(covey("pod", "status", "--home", str(home), "--json").stdout)
    assert status["device_id"] == info["device_id"]
    assert status["audit_chain"]["ok"] is True
    assert status["cipher"]["engine"].startswith("SQLCipher 4")
    assert status["kdf"]["name"] == "argon2id"
    assert status["counts"]["memories"] == 0


def test_home_from_environment(covey: Covey, home: Path, tmp_path: Path) -> None:
    env = cli_env(tmp_path, COVEY_HOME=str(home))
    assert covey("pod", "init", env=env).returncode == 0
    assert covey("memory", "add", "from env", env=env).returncode == 0
    listed = json.loads(covey("memory", "list", "--json", env=env).stdout)
    assert [m["text"] for m in listed] == ["from env"]


def test_errors_are_one_line(covey: Covey, home: Path, tmp_path: Path) -> None:
    _one_line_error(covey("memory", "list", "--home", str(home)), 3)  # no pod
    assert covey("pod", "init", "--home", str(home)).returncode == 0
    line = _one_line_error(covey("pod", "init", "--home", str(home)), 3)
    assert "already exists" in line
    wrong = cli_env(tmp_path, COVEY_PASSPHRASE="not the passphrase")
    assert "wrong passphrase" in _one_line_error(
        covey("memory", "list", "--home", str(home), env=wrong), 4)
    _one_line_error(covey("memory", "add", "   ", "--home", str(home)), 2)
    _one_line_error(covey("memory", "add", "x", "--kind", "gossip", "--home", str(home)), 2)
    _one_line_error(covey("memory", "forget", "42", "--home", str(home)), 2)
    _one_line_error(covey("pod", "frobnicate"), 2)
    _one_line_error(covey("memory", "forget", "not-a-number", "--home", str(home)), 2)


def test_no_passphrase_without_terminal(covey: Covey, home: Path, tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    del env["COVEY_PASSPHRASE"]
    line = _one_line_error(covey("pod", "init", "--home", str(home), env=env), 4)
    assert "COVEY_PASSPHRASE" in line
    assert not home.exists() or not any(home.iterdir())


def test_short_passphrase_refused(covey: Covey, home: Path, tmp_path: Path) -> None:
    env = cli_env(tmp_path, COVEY_PASSPHRASE="short")
    _one_line_error(covey("pod", "init", "--home", str(home), env=env), 2)
    assert not (home / "pod.key").exists()


def test_memory_commands(covey: Covey, home: Path) -> None:
    h = ("--home", str(home))
    covey("pod", "init", *h)
    a = json.loads(covey("memory", "add", "My sister Ana lives in Lisbon", "--kind", "fact",
                         *h, "--json").stdout)
    covey("memory", "add", "I prefer tea over coffee", "--kind", "preference", *h)
    hits = json.loads(covey("memory", "search", "where does my sister live", *h, "--json").stdout)
    assert hits[0]["id"] == a["id"]
    prefs = json.loads(covey("memory", "list", "--kind", "preference", *h, "--json").stdout)
    assert [m["text"] for m in prefs] == ["I prefer tea over coffee"]
    assert covey("memory", "forget", str(a["id"]), *h).returncode == 0
    assert json.loads(covey("memory", "search", "sister", *h, "--json").stdout) == []
    # Odd query syntax is words, not FTS5 operators.
    weird = covey("memory", "search", 'tea" OR NEAR(*', *h, "--json")
    assert weird.returncode == 0, weird.stderr
    assert len(json.loads(weird.stdout)) == 1


def test_forget_all_needs_confirmation(covey: Covey, home: Path) -> None:
    covey("pod", "init", "--home", str(home))
    _one_line_error(covey("pod", "forget", "--all", "--home", str(home)), 2)
    assert (home / "pod.key").exists()
    _one_line_error(covey("pod", "forget", "--home", str(home), "--yes"), 2)
    done = covey("pod", "forget", "--all", "--yes", "--home", str(home), "--json")
    assert done.returncode == 0, done.stderr
    assert "pod.key" in json.loads(done.stdout)["removed"]
    line = _one_line_error(covey("pod", "status", "--home", str(home)), 3)
    assert "erased" in line and "data key was destroyed" in line


def test_passwd(covey: Covey, home: Path, tmp_path: Path) -> None:
    covey("pod", "init", "--home", str(home))
    covey("memory", "add", "kept across passphrases", "--home", str(home))
    db_before = (home / "pod.db").read_bytes()
    env = cli_env(tmp_path, COVEY_NEW_PASSPHRASE="a brand new passphrase")
    assert covey("pod", "passwd", "--home", str(home), env=env).returncode == 0
    # The store is not re-encrypted: its SQLCipher salt (the first 16 bytes) is unchanged.
    assert (home / "pod.db").read_bytes()[:16] == db_before[:16]
    old = covey("memory", "list", "--home", str(home))
    _one_line_error(old, 4)
    new = cli_env(tmp_path, COVEY_PASSPHRASE="a brand new passphrase")
    listed = covey("memory", "list", "--home", str(home), "--json", env=new)
    assert [m["text"] for m in json.loads(listed.stdout)] == ["kept across passphrases"]


def test_demo_runs(covey: Covey) -> None:
    result = covey("demo", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "crypto-shred" in result.stdout
    assert "erased" in result.stdout


def test_corrupt_database_is_one_line_and_untouched(covey: Covey, home: Path) -> None:
    covey("pod", "init", "--home", str(home))
    for i in range(20):
        covey("memory", "add", f"note {i} " + "y" * 300, "--home", str(home))
    db = home / "pod.db"
    damaged = bytearray(db.read_bytes())
    damaged[len(damaged) // 2] ^= 0x55
    db.write_bytes(bytes(damaged))
    result = covey("pod", "status", "--home", str(home))
    line = _one_line_error(result, 6)
    assert "corrupt" in line and "pod.db" in line
    assert db.read_bytes() == bytes(damaged)
