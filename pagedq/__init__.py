"""pagedq: a Jupyter-native, quantized LLM inference engine with a paged KV cache.

The public API mirrors vLLM's: ``LLM``, ``SamplingParams``, ``RequestOutput``.
"""

from .beam_search import BeamSearchParams
from .config import EngineConfig
from .engine import LLMEngine
from .llm import LLM
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams
from .sequence import Logprob

__version__ = "0.1.0"


def load_ipython_extension(ipython) -> None:
    """``%load_ext pagedq``: registers ``%pagedq`` and ``%%generate`` (Jupyter code loads only here)."""
    from pagedq.jupyter_ext.magics import load_ipython_extension as load

    load(ipython)


def connect(url: str | None = None, token: str | None = None):
    """A handle on the shared engine (the Jupyter server's pagedq extension, or ``pagedq serve``):
    ``generate``/``chat``/``submit`` like the in-kernel engine, no model loaded here. See
    :func:`pagedq.jupyter_ext.client.connect`."""
    from pagedq.jupyter_ext.client import connect as _connect

    return _connect(url, token)


def unload_ipython_extension(ipython) -> None:
    from pagedq.jupyter_ext.magics import unload_ipython_extension as unload

    unload(ipython)


__all__ = [
    "LLM",
    "BeamSearchParams",
    "CompletionOutput",
    "EngineConfig",
    "LLMEngine",
    "Logprob",
    "RequestOutput",
    "SamplingParams",
    "__version__",
    "connect",
]
