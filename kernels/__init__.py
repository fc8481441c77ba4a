"""Attention, cache and weight-only GEMM ops of pagedq: one entry point per op, the
implementation chosen by device (:mod:`.backend`, ``PAGEDQ_BACKEND=torch|triton``).

* ``attention.py``: the entry points and the PyTorch implementation, the reference on every
  device and the fallback;
* ``cpu_linear.py``: dense layers over weights packed once for oneDNN (CPUs);
* ``native.py`` + ``csrc/``: C kernels for CPUs (paged decode attention; the AVX-512 BF16
  weight-only GEMM of ``pagedq.quant.linear.NativeQuantLinear``), built at first use;
* ``triton_attention.py``, ``triton_gemm.py``: Triton kernels for GPUs (decode, prefill/extend
  over the paged cache, KV write, block copy; W4A16/W8A16 GEMM), verified in Triton's
  interpreter on CPUs.
"""

from . import cpu_linear
from .attention import (
    AttentionMetadata,
    PrefillChunk,
    copy_blocks,
    paged_attention,
    paged_attention_decode,
    paged_attention_prefill,
    reshape_and_cache,
)

__all__ = [
    "AttentionMetadata",
    "PrefillChunk",
    "copy_blocks",
    "cpu_linear",
    "paged_attention",
    "paged_attention_decode",
    "paged_attention_prefill",
    "reshape_and_cache",
]
