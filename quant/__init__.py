"""Weight formats, quantizers and evaluation of pagedq (``import pagedq.quant``).

* reading: GPTQ (4/8-bit, act-order, v1/v2) and AWQ (GEMM) checkpoints load through
  ``LLM(path)``; ``LLM(path, quantization="int8" | "int4")`` quantizes a dense one on load;
* writing: :func:`quantize` makes a GPTQ / AWQ / RTN checkpoint from a dense one;
* execution: :mod:`pagedq.quant.linear` (``NativeQuantLinear``, ``Int4Linear``, ``Int8Linear``, ``GroupedLinear``);

Evaluation of whole models (perplexity, KL divergence, decode speed: ``evaluate`` / ``compare``)
opens engines, so it lives above the engine, in :mod:`pagedq.quality`. Everything here needs
torch alone.
"""

from .formats import QuantConfig, QuantWeight
from .quantize import QuantizeResult, quantize

__all__ = [
    "QuantConfig",
    "QuantWeight",
    "QuantizeResult",
    "quantize",
]
