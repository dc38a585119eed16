"""Every module imports on its own (no cycles), and dependencies point one way."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import covey

PACKAGES = ["covey", "covey.device", "covey.models", "covey.privacy", "covey.aggregator",
            "covey.protocols", "covey.simulations"]
LEAVES = ["covey.models", "covey.privacy", "covey.protocols"]
NOT_FROM_LEAVES = ("covey.device", "covey.aggregator", "covey.simulations")
# covey/ holds the base, below every package, and the top that mounts them all.
TOP = {"__main__.py", "cli.py", "_audit_cli.py", "_demo.py"}
NOT_FROM_BASE = ("covey.privacy", *NOT_FROM_LEAVES)


def _modules() -> list[str]:
    names = []
    for package in PACKAGES:
        module = __import__(package, fromlist=["_"])
        names.append(package)
        for info in pkgutil.walk_packages(module.__path__, prefix=package + "."):
            if info.name.startswith(tuple(PACKAGES[1:])) or package == "covey":
                names.append(info.name)
    return sorted(set(names) - {"covey.__main__"})


def test_each_module_imports_in_a_fresh_process() -> None:
    for name in _modules():
        result = subprocess.run([sys.executable, "-c", f"import {name}"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{name}: {result.stderr}"


def test_leaves_import_no_upper_layer() -> None:
    for leaf in LEAVES:
        code = (f"import sys, json, {leaf}; "
                "print(json.dumps(sorted(m for m in sys.modules if m.startswith('covey.'))))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True).stdout
        loaded = json.loads(out)
        assert not [m for m in loaded if m.startswith(NOT_FROM_LEAVES)], (leaf, loaded)


def _imports(files: list[Path]) -> Iterator[tuple[str, str]]:
    """(file:line, module) of every import statement, inside functions too."""
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                yield from ((f"{path}:{node.lineno}", a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                yield f"{path}:{node.lineno}", node.module


def test_no_import_statement_reaches_up_from_a_leaf_or_the_base() -> None:
    for leaf in LEAVES:
        folder = Path(__import__(leaf, fromlist=["_"]).__path__[0])
        wrong = [(where, m) for where, m in _imports(sorted(folder.rglob("*.py")))
                 if m.startswith(NOT_FROM_LEAVES)]
        assert wrong == [], wrong
    base = [p for p in Path(covey.__file__).parent.glob("*.py") if p.name not in TOP]
    wrong = [(where, m) for where, m in _imports(sorted(base)) if m.startswith(NOT_FROM_BASE)]
    assert wrong == [], wrong


def test_device_package_is_light() -> None:
    code = ("import sys, covey.device; "
            "print(any(m.split('.')[0] in ('torch', 'flwr', 'fastapi') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"


def test_public_api_is_declared() -> None:
    for package in PACKAGES:
        module = __import__(package, fromlist=["_"])
        assert isinstance(module.__all__, list)
        for name in module.__all__:
            assert hasattr(module, name), f"{package}.{name}"
    assert covey.__version__
