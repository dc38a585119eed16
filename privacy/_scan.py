"""A plaintext scan: does any file hold a copy of the user's own text?

The needles are the pod's recent messages, memories and training examples (UTF-8); the
haystack is every file covey wrote for the pod. Matching is exact and byte-wise. To scan
hundreds of needles through large files quickly, every needle is indexed by its first 8
bytes; each file is read as 8-byte words at all 8 alignments, a 24-bit hash of each word
looks up a bitmap of needle prefixes (NumPy, no Python loop over bytes), and only the
few candidate offsets are compared with the whole needle. A hit names the file, the
offset and which record's text it is, never the text.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Hit", "Needle", "needles_from", "scan_files"]

MIN_CHARS = 12  # shorter texts ("ok thanks") are too common to prove a leak
WINDOW = 40  # bytes of a long text used as a needle (its start and its middle)
_HASH_BITS = 24
_MUL = np.uint64(0x9E3779B97F4A7C15)
_CHUNK = 64 * 2**20


@dataclass(frozen=True)
class Needle:
    """A piece of the user's text to look for, and the record it came from."""

    data: bytes
    source: str  # e.g. "messages#12"


@dataclass(frozen=True)
class Hit:
    """Where a needle was found."""

    path: str
    offset: int
    source: str


def needles_from(records: Iterable[tuple[str, str]]) -> list[Needle]:
    """Needles from (source, text) records: texts of at least ``MIN_CHARS`` characters,
    by their first ``WINDOW`` bytes and, when longer, a middle window too."""
    out: dict[bytes, Needle] = {}
    for source, text in records:
        text = " ".join(text.split())
        if len(text) < MIN_CHARS:
            continue
        data = text.encode()
        pieces = [data[:WINDOW]]
        if len(data) > 2 * WINDOW:
            middle = len(data) // 2
            pieces.append(data[middle:middle + WINDOW])
        for piece in pieces:
            out.setdefault(piece, Needle(piece, source))
    return list(out.values())


def _hash(words: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return ((words * _MUL) >> np.uint64(64 - _HASH_BITS)).astype(np.int64)


class _Index:
    def __init__(self, needles: Sequence[Needle]) -> None:
        self.by_prefix: dict[bytes, list[Needle]] = {}
        for n in needles:
            self.by_prefix.setdefault(n.data[:8], []).append(n)
        self.bitmap = np.zeros(1 << _HASH_BITS, dtype=bool)
        if self.by_prefix:
            keys = np.frombuffer(b"".join(self.by_prefix), dtype="<u8")
            self.bitmap[_hash(keys)] = True

    def find(self, data: bytes, base: int) -> list[tuple[int, Needle]]:
        found = []
        for align in range(8):
            usable = (len(data) - align) // 8 * 8
            if usable <= 0:
                continue
            words = np.frombuffer(data, dtype="<u8", count=usable // 8, offset=align)
            for index in np.flatnonzero(self.bitmap[_hash(words)]):
                at = align + 8 * int(index)
                for needle in self.by_prefix.get(data[at:at + 8], []):
                    if data.startswith(needle.data, at):
                        found.append((base + at, needle))
        return found


def scan_files(paths: Iterable[Path], needles: Sequence[Needle]) -> tuple[list[Hit], int, int]:
    """Every hit of ``needles`` in ``paths``; also the files and bytes scanned."""
    index = _Index([n for n in needles if len(n.data) >= 8])
    hits: list[Hit] = []
    files = scanned = 0
    overlap = WINDOW
    for path in paths:
        try:
            with path.open("rb") as f:
                files += 1
                base, tail = 0, b""
                while chunk := f.read(_CHUNK):
                    data = tail + chunk
                    for offset, needle in index.find(data, base - len(tail)):
                        hit = Hit(str(path), offset, needle.source)
                        if hit not in hits:
                            hits.append(hit)
                    scanned += len(chunk)
                    base += len(chunk)
                    tail = data[-overlap:]
        except OSError:
            continue
    return hits, files, scanned


def files_under(*roots: Path) -> list[Path]:
    """Regular files under ``roots`` (symlinks not followed), sorted."""
    out = []
    for root in roots:
        if root.is_file():
            out.append(root)
            continue
        for folder, _, names in os.walk(root):
            out.extend(Path(folder) / n for n in names if (Path(folder) / n).is_file()
                       and not (Path(folder) / n).is_symlink())
    return sorted(set(out))
