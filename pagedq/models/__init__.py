"""Model implementations and checkpoint loading.

``ModelConfig`` and ``load_model`` load on first use, so that ``pagedq.models.default`` (the
name and folder of the shipped model) can be read without importing torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"SUPPORTED_ARCHITECTURES": ".config", "ModelConfig": ".config", "load_model": ".loader"}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pagedq.models' has no attribute {name!r}")


__all__ = ["SUPPORTED_ARCHITECTURES", "ModelConfig", "load_model"]
