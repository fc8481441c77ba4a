"""The notebook face of pagedq (``import pagedq.jupyter_ext``): magics, widgets, the engine driver.

``%load_ext pagedq`` registers ``%pagedq load|status|unload`` and ``%%generate``;
:func:`playground` and :func:`kv_cache_view` are ipywidgets. Imported lazily: the engine core
never imports Jupyter packages.
"""

from .driver import EngineDriver, Generation
from .magics import session, status


def playground(llm=None):
    """A sampling playground for ``llm`` (default: the model of ``%pagedq load``)."""
    from .widgets import Playground

    return Playground(llm)


def kv_cache_view(llm=None, live: bool = True):
    """A live picture of the KV block pool of ``llm`` (default: the model of ``%pagedq load``)."""
    from .widgets import KVCacheView

    return KVCacheView(llm, live=live)


__all__ = ["EngineDriver", "Generation", "kv_cache_view", "playground", "session", "status"]
