"""The built-in model's files, their model card, and integrity checks on load.

The artifacts are committed under ``models/artifacts/`` so a pod never trains and never
downloads: ``tokenizer.json``, ``base.safetensors`` (fp32 base weights, the reference),
``lm-int8.onnx`` (what pods run) and ``card.json`` (data, parameters, metrics, and the
SHA-256 of every file, checked on load).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from covey.errors import CoveyError

__all__ = ["ARTIFACT_FILES", "ArtifactError", "Artifacts", "artifact_dir", "sha256_file"]

ARTIFACT_FILES = ("tokenizer.json", "base.safetensors", "lm-int8.onnx")
CARD = "card.json"


class ArtifactError(CoveyError):
    """A model file is missing or does not match the hash in its model card."""

    exit_code = 6

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"model file {path} {reason}; rebuild with `covey models build`")
        self.path = path


def artifact_dir() -> Path:
    """``COVEY_MODEL_DIR`` if set, else the artifacts shipped with covey."""
    env = os.environ.get("COVEY_MODEL_DIR")
    return Path(env) if env else Path(__file__).resolve().parent / "artifacts"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Artifacts:
    """A verified set of model files and their card."""

    folder: Path
    card: dict[str, Any]

    @classmethod
    def load(cls, folder: Path | None = None, verify: bool = True) -> Artifacts:
        """Read the card and check every file against its hash.

        Raises:
            ArtifactError: the card or a file is missing, unreadable, or altered.
        """
        folder = folder or artifact_dir()
        card_path = folder / CARD
        try:
            card = json.loads(card_path.read_text(encoding="utf-8"))
            hashes = card["files"]
        except FileNotFoundError:
            raise ArtifactError(card_path, "is missing") from None
        except (ValueError, KeyError, TypeError):
            raise ArtifactError(card_path, "is not a valid model card") from None
        for name in ARTIFACT_FILES:
            path = folder / name
            if not path.exists():
                raise ArtifactError(path, "is missing")
            if verify and sha256_file(path) != hashes.get(name, {}).get("sha256"):
                raise ArtifactError(path, "is corrupt (SHA-256 does not match the model card)")
        return cls(folder, card)

    def path(self, name: str) -> Path:
        """Path of one artifact file."""
        return self.folder / name
