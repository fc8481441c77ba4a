"""The native CPU path: small C kernels built on first use with the system C compiler.

PyTorch's CPU attention (``scaled_dot_product_attention``) is tuned for long query blocks; a
decode step has one query per sequence, and had to gather every sequence's blocks padded to
the longest context first. The C kernel in ``csrc/paged_attention_cpu.c`` reads K/V in place
from the blocks and only up to each sequence's own length.

``csrc/woq_gemm_cpu.c`` multiplies bf16 activations by int8/int4 weight codes with AVX-512 BF16
(``woq_gemm``; ``NativeQuantLinear`` in ``pagedq.quant.linear``): torch's weight-only kernels
convert the weight again every few rows and fall behind a bf16 GEMM from ~8 rows on.

The library is compiled once per source version and CPU (``-march=native``) into
``$PAGEDQ_CACHE/native`` and loaded with ctypes (which releases the GIL during the call).
Without a C compiler, or with ``PAGEDQ_CPU_KERNELS=torch``, pagedq uses the torch
implementation instead; both are tested against each other.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from typing import Any

import torch

logger = logging.getLogger(__name__)

_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
_SRCS = [os.path.join(_CSRC, name) for name in ("paged_attention_cpu.c", "woq_gemm_cpu.c")]
_FLAGS = [
    "-O3",
    "-march=native",
    "-ffast-math",
    "-fno-finite-math-only",
    "-fopenmp",
    "-fPIC",
    "-std=c11",
]
# Linked separately and without -ffast-math: linking with it adds crtfastmath.o, whose
# constructor turns on flush-to-zero / denormals-are-zero for the whole process when the
# library loads (every numpy and torch float in a notebook kernel would lose its subnormals).
_LINK_FLAGS = ["-shared", "-fopenmp"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False

_FUNCS = {torch.float32: "paged_decode_f32", torch.bfloat16: "paged_decode_bf16"}


def _cache_dir() -> str:
    root = os.environ.get("PAGEDQ_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "pagedq"))
    return os.path.join(root, "native")


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _build() -> ctypes.CDLL | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        logger.warning("no C compiler found: the native CPU kernels are off, attention uses the torch path")
        return None
    src = b"".join(_read(p) for p in _SRCS)
    flags = " ".join(_FLAGS + _LINK_FLAGS).encode()
    key = hashlib.sha256(src + flags + _cpu_id().encode()).hexdigest()[:16]
    path = os.path.join(_cache_dir(), f"libpagedq_cpu_{key}.so")
    if not os.path.isfile(path):
        os.makedirs(_cache_dir(), exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=_cache_dir())
        os.close(fd)
        with tempfile.TemporaryDirectory(dir=_cache_dir()) as build:
            objs = [os.path.join(build, os.path.basename(src) + ".o") for src in _SRCS]
            steps = [[cc, *_FLAGS, "-c", src, "-o", obj] for src, obj in zip(_SRCS, objs)]
            steps.append([cc, *_LINK_FLAGS, *objs, "-o", tmp, "-lm"])
            for cmd in steps:
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    os.unlink(tmp)
                    logger.warning(
                        "building the native CPU kernels failed, using the torch path:\n%s",
                        proc.stderr[-2000:],
                    )
                    return None
        os.replace(tmp, path)  # atomic: concurrent builders never load a half-written file
    lib = ctypes.CDLL(path)
    for name in _FUNCS.values():
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_int]
    lib.woq_available.restype = ctypes.c_int
    lib.woq_available.argtypes = []
    lib.woq_gemm_bf16.restype = None
    woq_args: list[Any] = (
        [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
        + [ctypes.c_void_p] * 2
        + [ctypes.c_int] * 2
        + [ctypes.c_void_p]
        + [ctypes.c_int] * 3
    )
    lib.woq_gemm_bf16.argtypes = woq_args
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they are off or cannot be built."""
    global _lib, _tried
    if os.environ.get("PAGEDQ_CPU_KERNELS", "native") == "torch":
        return None
    if not _tried:
        with _lock:
            if not _tried:
                _lib = _build()
                _tried = True
    return _lib


def supports(query: torch.Tensor, k_cache: torch.Tensor) -> bool:
    return (
        query.device.type == "cpu"
        and query.dtype in _FUNCS
        and k_cache.dtype == query.dtype
        and k_cache.is_contiguous()
        and library() is not None
    )


def paged_decode(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``query`` [B, H, D] against each sequence's blocks; ``block_tables`` [B, max_blocks] int64."""
    lib = library()
    q = query.contiguous()
    out = torch.empty_like(q)
    b, h, d = q.shape
    _, bs, kvh, _ = k_cache.shape
    fn = getattr(lib, _FUNCS[q.dtype])
    fn(
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        block_tables.data_ptr(),
        context_lens.data_ptr(),
        out.data_ptr(),
        b,
        h,
        kvh,
        d,
        bs,
        block_tables.shape[1],
        float(scale),
        torch.get_num_threads(),
    )
    return out


def woq_supported() -> bool:
    """Whether the weight-only-quantized GEMM can run here (built, and the CPU has AVX-512 BF16)."""
    lib = library()
    return lib is not None and bool(lib.woq_available())


def woq_gemm(
    x: torch.Tensor,
    codes: torch.Tensor,
    bits: int,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group: int,
    kc: int,
    out_features: int,
) -> torch.Tensor:
    """``x`` [M, K] bf16 times the weight held as panel-packed codes (see
    ``csrc/woq_gemm_cpu.c``): ``scales`` [K/group, Np] fp32, ``zeros`` [K/group, Np] uint8."""
    x = x.contiguous()
    m, k = x.shape
    y = torch.empty(m, out_features, dtype=torch.bfloat16)
    lib = library()
    if lib is None:
        raise RuntimeError("the native CPU kernels are not available (see woq_supported)")
    lib.woq_gemm_bf16(
        x.data_ptr(), m, k, codes.data_ptr(), bits, scales.data_ptr(), zeros.data_ptr(), group, kc,
        y.data_ptr(), out_features, scales.shape[1], torch.get_num_threads(),
    )  # fmt: skip
    return y
