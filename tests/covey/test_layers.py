"""What may import what, read from every import statement in the package code, those
inside functions included (a function-local import is still a dependency).

The rules (ARCHITECTURE.md):
- a package's private modules (a name starting with ``_``, at any depth) are its own:
  another package goes through the front door (``covey.device``, or a public module such
  as ``covey.device.cli``);
- the leaves (models, privacy, protocols) import nothing from device, aggregator or
  simulations;
- the base (``covey/*.py`` but the command line and the demo at the top) imports no
  package at all;
- in device, the rooms that hold the pod's data (store, memory) import none of the rooms
  that act on it (sync, federation, api, cli): the pod wires those together.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("device", "models", "privacy", "aggregator", "protocols", "simulations")
LEAVES = ("models", "privacy", "protocols")
UPPER = ("device", "aggregator", "simulations")
#: The base's top: the command line, the audit command and the demo may import anything.
TOP = ("covey.cli", "covey.__main__", "covey._demo", "covey._audit_cli")
DATA_ROOMS = ("store", "memory")
ACTING_ROOMS = ("sync", "federation", "api", "cli")


def _module_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts if parts[0] == "covey" else ["covey", *parts])


def _sources() -> Iterator[tuple[str, Path]]:
    for top in ("covey", *PACKAGES):
        for path in sorted((ROOT / top).rglob("*.py")):
            yield _module_of(path), path


def imports(source: str) -> Iterator[str]:
    """Every ``covey`` module an import statement in ``source`` names, wherever it stands
    (``from covey.x import _y`` names ``covey.x._y`` too, since ``_y`` may be a module)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "covey")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.split(".")[0] == "covey":
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__"))


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in PACKAGES else None


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "device" else None


def violation(importer: str, imported: str) -> str | None:
    """Why ``importer`` may not import ``imported``, or None."""
    mine, theirs = _package(importer), _package(imported)
    if _room(importer) in DATA_ROOMS and _room(imported) in ACTING_ROOMS:
        return "a data room imports a room that acts on it"
    if mine is None and importer not in TOP and theirs is not None:
        return "the base imports a package"
    if mine in LEAVES and theirs in UPPER:
        return "a leaf imports an upper layer"
    if theirs is not None and theirs != mine and \
            any(p.startswith("_") for p in imported.split(".")[2:]):
        return "another package's private module"
    return None


def violations() -> set[tuple[str, str]]:
    found = set()
    for module, path in _sources():
        for imported in imports(path.read_text()):
            if violation(module, imported):
                found.add((module, imported))
    return found


@pytest.mark.parametrize(("importer", "source", "why"), [
    ("covey.privacy._report", "def f():\n    from covey.device._pod import DB_FILE\n",
     "a leaf imports an upper layer"),
    ("covey.privacy.cli", "def f():\n    import covey.simulations\n",
     "a leaf imports an upper layer"),
    ("covey.logs", "from covey.privacy import RedactingFilter\n", "the base imports a package"),
    ("covey._demo", "def f():\n    from covey.device._chat import Assistant\n",
     "another package's private module"),
    ("covey.simulations._x", "from covey.device import _federated\n",
     "another package's private module"),
    ("covey.aggregator._x", "import covey.models._adapter as a\n",
     "another package's private module"),
    ("covey.device.memory._memory",
     "def delete():\n    from covey.device.sync._sync import record_forgotten\n",
     "a data room imports a room that acts on it"),
])
def test_each_kind_of_violation_is_found(importer: str, source: str, why: str) -> None:
    assert [violation(importer, m) for m in imports(source)
            if violation(importer, m)] == [why]


@pytest.mark.parametrize(("importer", "source"), [
    ("covey._demo", "from covey.device import Pod\nfrom covey.device.cli import app\n"),
    ("covey.device._x", "from covey.device._pod import Pod\nfrom covey._files import w\n"),
    ("covey.simulations._x", "from covey.models import TinyLM\n"),
    ("covey.cli", "from covey.privacy import cli\n"),
])
def test_front_doors_and_own_rooms_are_allowed(importer: str, source: str) -> None:
    assert not [m for m in imports(source) if violation(importer, m)]


def test_imports_follow_the_layers() -> None:
    found = sorted(f"{a} -> {b}: {violation(a, b)}" for a, b in violations())
    assert not found, "\n".join(found)
