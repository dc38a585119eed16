"""Where a pod lives: ``--home``, else ``COVEY_HOME``, else the platform's data folder."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

__all__ = ["default_home", "resolve_home"]


def default_home() -> Path:
    """The platform's user data folder for covey's pod."""
    return Path(platformdirs.user_data_dir("covey", appauthor=False)) / "pod"


def resolve_home(home: Path | None) -> Path:
    """The pod home to use, from the argument, the environment or the default."""
    if home is not None:
        return home.expanduser().absolute()
    env = os.environ.get("COVEY_HOME")
    if env:
        return Path(env).expanduser().absolute()
    return default_home()
