"""Model implementations and checkpoint loading.

``ModelConfig`` and ``load_model`` load on first use, so that ``pagedq.models.default`` (the
name and folder of the shipped model) can be read without importing torch.
"""

from __future__ import annotations

from pagedq._lazy import lazy_exports

_EXPORTS = {
    "ARCHITECTURES": ".registry",
    "ModelConfig": ".config",
    "load_model": ".loader",
    "read_config": ".registry",
    "register_architecture": ".registry",
}


__getattr__ = lazy_exports(__name__, _EXPORTS, globals())


__all__ = ["ARCHITECTURES", "ModelConfig", "load_model", "read_config", "register_architecture"]
