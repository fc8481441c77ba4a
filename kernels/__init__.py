"""Attention and cache ops of pagedq: one entry point per op, implementations chosen by device.

Today every op runs the native PyTorch implementation (``kernels/attention.py``), which is the
reference on every device and the CPU fast path.
"""

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
    "paged_attention",
    "paged_attention_decode",
    "paged_attention_prefill",
    "reshape_and_cache",
]
