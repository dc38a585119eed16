"""Shared fixtures: a fast KDF for tests, pod homes, and the real `covey` command."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from covey.device import KdfParams, Pod, PodConfig

PASSPHRASE = "correct horse battery staple"

# Tests unlock pods hundreds of times; the product's KDF cost is measured by `make bench`.
FAST_KDF_ENV = {"COVEY_KDF_TIME_COST": "1", "COVEY_KDF_MEMORY_KIB": "8192",
                "COVEY_KDF_PARALLELISM": "1"}
FAST_CONFIG = PodConfig(kdf_time_cost=1, kdf_memory_kib=8192, kdf_parallelism=1)
assert FAST_CONFIG.kdf == KdfParams(1, 8192, 1)


@pytest.fixture(autouse=True)
def _fast_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in FAST_KDF_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("COVEY_HOME", raising=False)
    monkeypatch.delenv("COVEY_PASSPHRASE", raising=False)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A pod home that does not exist yet."""
    return tmp_path / "pod"


@pytest.fixture
def pod(home: Path) -> Iterator[Pod]:
    """A fresh, unlocked pod."""
    with Pod.create(home, PASSPHRASE, name="test", config=FAST_CONFIG) as p:
        yield p


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment a subprocess `covey` runs with: fast KDF, private TMPDIR."""
    # COVEY_NATIVE_BF16 says what the machine is (or is made to look like), not the pod.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("COVEY_") or k == "COVEY_NATIVE_BF16"}
    env.update(FAST_KDF_ENV)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir(exist_ok=True)
    env["TMPDIR"] = str(tmpdir)
    env["COVEY_PASSPHRASE"] = PASSPHRASE
    env.update(extra)
    return env


Covey = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def covey(tmp_path: Path) -> Covey:
    """Run the real `covey` command in a subprocess; returns the completed process."""

    def run(*args: str, env: dict[str, str] | None = None, input: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "covey", *args], env=env or cli_env(tmp_path),
            capture_output=True, text=True, input=input, timeout=timeout,
            stdin=None if input is not None else subprocess.DEVNULL,
        )

    return run
