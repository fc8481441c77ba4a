"""Weight formats, quantizers and evaluation of pagedq (``import pagedq.quant``).

The engine loads unquantized checkpoints today; quantized formats arrive here with the
quantization work (see the README's roadmap).
"""
