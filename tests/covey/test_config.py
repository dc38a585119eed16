"""Config loading: defaults, TOML, then COVEY_* variables; invalid values are one error."""

from __future__ import annotations

from pathlib import Path

import pytest

from covey import config
from covey.device import PodConfig
from covey.errors import ConfigError


def test_precedence(tmp_path: Path) -> None:
    toml = tmp_path / "config.toml"
    toml.write_text("[pod]\nkdf_time_cost = 4\nbusy_timeout_ms = 500\n")
    loaded = config.load(PodConfig, toml, table="pod", env={"COVEY_BUSY_TIMEOUT_MS": "750"})
    assert loaded.kdf_time_cost == 4
    assert loaded.busy_timeout_ms == 750
    assert loaded.kdf_memory_kib == PodConfig().kdf_memory_kib


def test_missing_file_gives_defaults(tmp_path: Path) -> None:
    assert config.load(PodConfig, tmp_path / "absent.toml", env={}) == PodConfig()


@pytest.mark.parametrize(("text", "env", "fragment"), [
    ("[pod]\nkdf_time_cost = 0\n", {}, "time_cost"),
    ("[pod]\nnot_a_setting = 1\n", {}, "unknown setting"),
    ("[pod\n", {}, "not valid TOML"),
    ("", {"COVEY_KDF_MEMORY_KIB": "lots"}, "must be a number"),
    ("", {"COVEY_KDF_MEMORY_KIB": "16"}, "memory_kib"),
])
def test_invalid(tmp_path: Path, text: str, env: dict[str, str], fragment: str) -> None:
    toml = tmp_path / "config.toml"
    toml.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        config.load(PodConfig, toml, table="pod", env=env)


def test_frozen() -> None:
    with pytest.raises(AttributeError):
        PodConfig().busy_timeout_ms = 1  # type: ignore[misc]
