"""Every module imports on its own (no cycles), and dependencies point one way at import
time (tests/covey/test_layers.py reads every import statement)."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import covey

PACKAGES = ["covey", "covey.device", "covey.models", "covey.privacy", "covey.aggregator",
            "covey.protocols", "covey.simulations"]
LEAVES = ["covey.models", "covey.privacy", "covey.protocols"]
NOT_FROM_LEAVES = ("covey.device", "covey.aggregator", "covey.simulations")


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
