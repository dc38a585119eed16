"""Configuration as frozen dataclasses, loaded from TOML and ``COVEY_*`` variables.

Precedence, lowest first: the dataclass defaults, a TOML table, then environment
variables named ``COVEY_<FIELD>`` (upper case). Validation is the dataclass's own
``__post_init__``, which raises ``ValueError``; :func:`load` turns that into a
:class:`~covey.errors.ConfigError` naming the source.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import platformdirs

from covey.errors import ConfigError

__all__ = ["CACHE_ENV", "cache_dir", "load"]

CACHE_ENV = "COVEY_CACHE_DIR"

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(value: str, kind: Any, name: str) -> Any:
    if kind is bool:
        low = value.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"{name} must be a boolean (true/false), got {value!r}")
    if kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if kind is Path:
        return Path(value).expanduser()
    return value


def load(
    cls: type[T],
    toml_path: Path | None = None,
    table: str | None = None,
    env: Mapping[str, str] | None = None,
    prefix: str = "COVEY_",
) -> T:
    """Build a frozen config dataclass from defaults, an optional TOML file and env vars.

    Raises:
        ConfigError: the TOML cannot be parsed, a key is unknown, or a value is invalid.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    env = os.environ if env is None else env
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if toml_path is not None and toml_path.exists():
        try:
            data = tomllib.loads(toml_path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{toml_path} is not valid TOML: {exc}") from None
        if table is not None:
            data = data.get(table, {})
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ConfigError(f"{toml_path}: unknown setting(s) {', '.join(unknown)}")
        values.update(data)
    for name in fields:
        var = f"{prefix}{name.upper()}"
        if var in env:
            values[name] = _coerce(env[var], hints[name], var)
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None


def cache_dir() -> Path:
    """covey's cache root (models, the safety classifier, the register of temporary
    folders): ``COVEY_CACHE_DIR`` if set, else the platform's user cache folder."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    return Path(platformdirs.user_cache_dir("covey", appauthor=False))
