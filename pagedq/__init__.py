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
]
