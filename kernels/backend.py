"""Which implementation an op runs: ``torch`` or ``triton``.

Triton on a GPU device (CUDA, ROCm, XPU) when the ``triton`` package is installed, torch
elsewhere. ``PAGEDQ_BACKEND=triton`` forces Triton on any device — with
``TRITON_INTERPRET=1`` on a CPU that runs the Triton kernels in Triton's interpreter, which
is how they are tested on machines without a GPU; ``PAGEDQ_BACKEND=torch`` forces torch.
"""

from __future__ import annotations

import functools
import os

import torch

_GPU_TYPES = ("cuda", "xpu")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def backend(device: torch.device) -> str:
    forced = os.environ.get("PAGEDQ_BACKEND", "").strip().lower()
    if forced not in ("", "torch", "triton"):
        raise ValueError(f"PAGEDQ_BACKEND must be 'torch' or 'triton', got {forced!r}")
    if forced == "torch":
        return "torch"
    if forced == "triton":
        if not triton_available():
            raise ValueError("PAGEDQ_BACKEND=triton needs the triton package: pip install 'pagedq[triton]'")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("PAGEDQ_BACKEND=triton on a CPU needs TRITON_INTERPRET=1 (Triton's interpreter)")
        return "triton"
    return "triton" if device.type in _GPU_TYPES and triton_available() else "torch"
