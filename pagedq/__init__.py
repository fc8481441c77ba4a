"""pagedq: a Jupyter-native, quantized LLM inference engine with a paged KV cache.

The public API mirrors vLLM's: ``LLM``, ``SamplingParams``, ``RequestOutput``.

Names are imported on first use, so that processes that only serve or call the shared engine
(the HTTP server, ``pagedq.connect()`` in a kernel) never import torch.
"""

from __future__ import annotations

from ._lazy import lazy_exports
from ._version import __version__

_EXPORTS = {
    "LLM": ".llm",
    "BeamSearchParams": ".sampling_params",
    "CompletionOutput": ".outputs",
    "EngineConfig": ".config",
    "GenerationError": ".outputs",
    "LLMEngine": ".engine",
    "Logprob": ".outputs",
    "RequestOutput": ".outputs",
    "SamplingParams": ".sampling_params",
}


__getattr__ = lazy_exports(__name__, _EXPORTS, globals())


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


def load_ipython_extension(ipython) -> None:
    """``%load_ext pagedq``: registers ``%pagedq`` and ``%%generate`` (Jupyter code loads only here)."""
    from pagedq.jupyter_ext.magics import load_ipython_extension as load

    load(ipython)


def connect(url: str | None = None, token: str | None = None, **kwargs):
    """A handle on the shared engine (the Jupyter server's pagedq extension, ``pagedq serve`` or
    the hub service): ``generate``/``chat``/``submit`` like the in-kernel engine, no model loaded
    here; every failure raises. See :func:`pagedq.serve.client.connect`."""
    from pagedq.serve.client import connect as _connect

    return _connect(url, token, **kwargs)


def unload_ipython_extension(ipython) -> None:
    from pagedq.jupyter_ext.magics import unload_ipython_extension as unload

    unload(ipython)


__all__ = [
    "LLM",
    "BeamSearchParams",
    "CompletionOutput",
    "EngineConfig",
    "GenerationError",
    "LLMEngine",
    "Logprob",
    "RequestOutput",
    "SamplingParams",
    "__version__",
    "connect",
]
