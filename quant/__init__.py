"""Weight formats, quantizers and evaluation of pagedq (``import pagedq.quant``).

* reading: GPTQ (4/8-bit, act-order, v1/v2) and AWQ (GEMM) checkpoints load through
  ``LLM(path)``; ``LLM(path, quantization="int8" | "int4")`` quantizes a dense one on load;
* writing: :func:`quantize` makes a GPTQ / AWQ / RTN checkpoint from a dense one;
* execution: :mod:`pagedq.quant.linear` (``NativeQuantLinear``, ``Int4Linear``, ``Int8Linear``, ``GroupedLinear``);
* evaluation: :func:`evaluate` / :func:`compare` (perplexity, KL divergence from a reference,
  weight bytes, decode tokens/s).

Everything here needs torch alone.
"""

from .evaluate import Comparison, EvalResult, compare, evaluate
from .formats import QuantConfig, QuantWeight
from .quantize import QuantizeResult, quantize

__all__ = [
    "Comparison",
    "EvalResult",
    "QuantConfig",
    "QuantWeight",
    "QuantizeResult",
    "compare",
    "evaluate",
    "quantize",
]
