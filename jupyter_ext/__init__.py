"""The notebook face of pagedq (``import pagedq.jupyter_ext``): magics, widgets, and the thin
Jupyter wrappers of the shared engine (:mod:`pagedq.serve`): the jupyter-server extension and the
JupyterHub service's identity.

``%load_ext pagedq`` registers ``%pagedq load|status|unload`` and ``%%generate``;
:func:`playground` and :func:`kv_cache_view` are ipywidgets. Imported lazily: the engine core
never imports Jupyter packages.
"""

from pagedq.driver import EngineDriver, Generation


def __getattr__(name):  # the magics need IPython: imported when asked for, not by the server extension
    if name in ("session", "status"):
        from . import magics

        return getattr(magics, name)
    raise AttributeError(name)


def _jupyter_server_extension_points():
    """jupyter-server's entry point (the wheel enables it): the shared engine's API."""
    from .serverext import PagedqExtension

    return [{"module": "pagedq.jupyter_ext.serverext", "app": PagedqExtension}]


def playground(llm=None):
    """A sampling playground for ``llm`` (default: the model of ``%pagedq load``)."""
    from .widgets import Playground

    return Playground(llm)


def kv_cache_view(llm=None, live: bool = True):
    """A live picture of the KV block pool of ``llm`` (default: the model of ``%pagedq load``)."""
    from .widgets import KVCacheView

    return KVCacheView(llm, live=live)


__all__ = ["EngineDriver", "Generation", "kv_cache_view", "playground", "session", "status"]
