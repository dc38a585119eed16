"""The temporary folders covey makes, and the register that lets the pod report find them.

Every temporary folder covey makes (the demo's pod, the empirical audit's replica, a
model build's export, benchmarks) comes from :func:`temporary_directory`, which
records its path in ``<cache>/temporary-folders`` before anything is written into it.
The pod report's plaintext scan reads that register (:func:`registered_folders`), so it
scans the temporary files covey made, and never a person's own folder that merely has a
covey-like name in ``TMPDIR``. The register holds paths only, never content.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["REGISTER", "registered_folders", "temporary_directory"]

REGISTER = "temporary-folders"
_PRUNE_AT = 256  # entries; past this, folders removed since are dropped from the register


def _register_path() -> Path:
    from covey.config import cache_dir

    return cache_dir() / REGISTER


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[int]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # concurrent covey processes append in turn
        yield fd
    finally:
        os.close(fd)


def _read(fd: int) -> list[str]:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace").splitlines()


def _register(folder: Path) -> None:
    with _locked(_register_path()) as fd:
        os.write(fd, f"{folder}\n".encode())
        lines = _read(fd)
        if len(lines) > _PRUNE_AT:
            kept = [line for line in lines if Path(line).is_dir()]
            os.ftruncate(fd, 0)
            os.write(fd, "".join(f"{line}\n" for line in kept).encode())


def registered_folders() -> list[Path]:
    """The temporary folders covey made that still exist and belong to this user."""
    path = _register_path()
    if not path.exists():
        return []
    with _locked(path) as fd:
        lines = _read(fd)
    found = []
    for line in dict.fromkeys(lines):
        folder = Path(line)
        with contextlib.suppress(OSError):
            if (folder.is_absolute() and not folder.is_symlink() and folder.is_dir()
                    and folder.stat().st_uid == os.getuid()):
                found.append(folder)
    return found


@contextlib.contextmanager
def temporary_directory(prefix: str) -> Iterator[Path]:
    """A new temporary folder (in ``TMPDIR``, mode 0700), registered for the pod
    report's scan, removed with its contents when the block ends."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        folder = Path(tmp).absolute()
        _register(folder)
        yield folder
