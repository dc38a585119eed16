"""Front doors that import a name only when it is first used."""

from __future__ import annotations

import importlib
from collections.abc import Mapping, MutableMapping
from typing import Any

__all__ = ["lazy_attribute"]


def lazy_attribute(package: str, table: Mapping[str, str], name: str,
                   namespace: MutableMapping[str, Any]) -> Any:
    """``name`` from ``package``'s module ``table[name]``, kept in ``namespace`` (the
    package's globals) so that it is imported once; a package's ``__getattr__``.

    Raises:
        AttributeError: ``name`` is not in ``table``.
    """
    if name not in table:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{package}.{table[name]}"), name)
    namespace[name] = value
    return value
