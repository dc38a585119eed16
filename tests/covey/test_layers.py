"""What may import what, read from every import statement in the package code, those
inside functions included (a function-local import is still a dependency).

The rules (ARCHITECTURE.md):
- a package's private modules (a name starting with ``_``, at any depth) are its own:
  another package goes through the front door (``covey.device``, or a public module such
  as ``covey.device.cli``);
- the leaves (models, privacy, protocols) import nothing from device, aggregator or
  simulations;
- the base (``covey/*.py`` but the command line and the demo at the top) imports no
  package at all.
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

#: Imports that break a rule today, each to be removed by the restructuring of issue 23.
#: The test fails on any violation not listed here, and on any listed one that is gone,
#: so the list only shrinks.
KNOWN: set[tuple[str, str]] = {
    ("covey._audit_cli", "covey.device._pod_audit"),
    ("covey._audit_cli", "covey.simulations._replica"),
    ("covey._demo", "covey.aggregator._deploy"),
    ("covey._demo", "covey.device._pod_audit"),
    ("covey._demo", "covey.device.assistant._chat"),
    ("covey._demo", "covey.device.assistant._feedback"),
    ("covey._demo", "covey.device.federation._join"),
    ("covey._demo", "covey.device.federation._participation"),
    ("covey._demo", "covey.simulations._population"),
    ("covey._demo", "covey.simulations._replica"),
    ("covey._tempdirs", "covey.models._embedder"),
    ("covey.aggregator._evaluation", "covey.models._evaluate"),
    ("covey.aggregator._registry", "covey.protocols._trusted_app"),
    ("covey.device._pod_audit", "covey.models._embedder"),
    ("covey.device.assistant._chat", "covey.models._artifacts"),
    ("covey.device.assistant._chat", "covey.models._generate"),
    ("covey.device.assistant._egress", "covey.models._generate"),
    ("covey.device.assistant._egress", "covey.models._tokenizer"),
    ("covey.device.cli._sync", "covey.protocols._channel"),
    ("covey.device.federation._federated", "covey.models._finetune"),
    ("covey.device.federation._join", "covey.protocols._trusted_app"),
    ("covey.device.federation._participation", "covey.models._finetune"),
    ("covey.device.safety._safety", "covey.models._data"),
    ("covey.device.safety._safety", "covey.models._embedder"),
    ("covey.device.sync._sync", "covey.protocols._crdt"),
    ("covey.device.sync._sync", "covey.protocols._hlc"),
    ("covey.device.sync._sync", "covey.protocols._identity"),
    ("covey.device.sync._sync", "covey.protocols._trust"),
    ("covey.device.sync._sync_loop", "covey.protocols._channel"),
    ("covey.device.sync._sync_loop", "covey.protocols._discovery"),
    ("covey.device.sync._sync_loop", "covey.protocols._session"),
    ("covey.simulations._canaries", "covey.aggregator._rounds"),
    ("covey.simulations._canaries", "covey.device.federation._federated"),
    ("covey.simulations._engine", "covey.aggregator._rounds"),
    ("covey.simulations._engine", "covey.device._pod"),
    ("covey.simulations._engine", "covey.device.federation._participation"),
    ("covey.simulations._flower", "covey.aggregator._rounds"),
    ("covey.simulations._flower", "covey.aggregator._serverapp"),
    ("covey.simulations._flower", "covey.device.federation._clientapp"),
    ("covey.simulations._flower", "covey.device.federation._participation"),
    ("covey.simulations._population", "covey.device.assistant._feedback"),
    ("covey.simulations._population", "covey.device.federation._participation"),
    ("covey.simulations._replica", "covey.aggregator._registry"),
    ("covey.simulations._replica", "covey.aggregator._run_audit"),
    ("covey.simulations._replica", "covey.models._tokenizer"),
    ("covey.simulations._simulate", "covey.aggregator._evaluation"),
    ("covey.simulations._simulate", "covey.aggregator._registry"),
    ("covey.simulations._simulate", "covey.aggregator._rounds"),
    ("covey.simulations._simulate", "covey.device.federation._federated"),
    ("covey.simulations._simulate", "covey.models._evaluate"),
    ("covey.simulations._simulate", "covey.models._finetune"),
    ("covey.simulations._sweep", "covey.aggregator._registry"),
    ("covey.simulations.bench", "covey.models._bench"),
    ("covey.simulations.bench", "covey.models._bench_embedder"),
    ("covey.simulations.bench._audit", "covey.device._pod_audit"),
    ("covey.simulations.bench._context", "covey.device.assistant._chat"),
    ("covey.simulations.bench._context", "covey.device.context._capture"),
    ("covey.simulations.bench._context", "covey.device.context._context"),
    ("covey.simulations.bench._context", "covey.device.safety._safety"),
    ("covey.simulations.bench._context", "covey.models._data"),
    ("covey.simulations.bench._federated", "covey.aggregator._deploy"),
    ("covey.simulations.bench._federated", "covey.aggregator._strategy"),
    ("covey.simulations.bench._federated", "covey.device.federation._federated"),
    ("covey.simulations.bench._federated", "covey.device.federation._join"),
    ("covey.simulations.bench._federated", "covey.models._finetune"),
    ("covey.simulations.bench._recall", "covey.device.memory._memory"),
    ("covey.simulations.bench._recall", "covey.device.memory._vector"),
    ("covey.simulations.bench._recall", "covey.device.store._keys"),
    ("covey.simulations.bench._recall", "covey.device.store._store"),
    ("covey.simulations.bench._store", "covey.device.memory._memory"),
    ("covey.simulations.bench._store", "covey.device.store._keys"),
    ("covey.simulations.bench._store", "covey.device.store._store"),
    ("covey.simulations.bench._sync", "covey.device.assistant._feedback"),
    ("covey.simulations.bench._sync", "covey.device.sync._sync"),
    ("covey.simulations.bench._sync", "covey.device.sync._sync_loop"),
    ("covey.simulations.bench._sync", "covey.protocols._discovery"),
    ("covey.simulations.bench._sync", "covey.protocols._session"),
    ("covey.simulations.bench._turn", "covey.device.assistant._chat"),
    ("covey.simulations.bench._turn", "covey.device.assistant._orchestrator"),
}


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


def violation(importer: str, imported: str) -> str | None:
    """Why ``importer`` may not import ``imported``, or None."""
    mine, theirs = _package(importer), _package(imported)
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
    found = violations()
    new = sorted(f"{a} -> {b}: {violation(a, b)}" for a, b in found - KNOWN)
    assert not new, "\n".join(new)
    gone = sorted(f"{a} -> {b}" for a, b in KNOWN - found)
    assert not gone, "no longer imported; remove from KNOWN:\n" + "\n".join(gone)
