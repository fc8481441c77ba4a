"""Names of a package that load on first use (so that importing the package loads no torch)."""

from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, str], namespace: dict):
    """A module ``__getattr__`` for ``package`` that imports ``exports[name]`` (a relative module)
    on first access of ``name`` and keeps it in ``namespace`` (the package's globals)."""

    def __getattr__(name: str):
        if name in exports:
            value = getattr(importlib.import_module(exports[name], package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
