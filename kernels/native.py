"""The native CPU path: small C kernels built on first use with the system C compiler.

PyTorch's CPU attention (``scaled_dot_product_attention``) needs contiguous K/V: a paged cache
had to be gathered per step, every sequence padded to the longest context. The C kernel in
``csrc/paged_attention_cpu.c`` serves a whole step — decodes and prefill/extend chunks, float32
or bf16 queries, a cache of the query's dtype, int8 codes with scales or fp8 bytes, sliding
windows — reading K/V in place from the blocks and only up to each query's own position.

``csrc/elementwise_cpu.c`` fuses a decoder layer's elementwise work (residual add + RMSNorm,
SiLU * up), one pass each where torch runs several ops with a temporary each.

``csrc/gemv_cpu.c`` multiplies up to a few dozen rows (decode steps) by a float32 or bf16 weight
laid out in panels (``panels``), streaming it once at the memory's speed at one row and at the
GEMM's rate from ~16 rows (``gemv``; used by :mod:`.cpu_linear` up to 64 rows).

``csrc/amx_gemm_cpu.c`` does the same for bf16 through AMX tiles where the CPU has them, on a
weight laid out as tiles (``amx_tiles``; ``gemv`` picks the kernel by the layout): the panels'
vdpbf16ps run out of multiply throughput above ~8 rows, tiles stream the weight at up to 64.

``csrc/decoder_cpu.c`` runs all decoder layers of a few-row step (batch-1 decode) in one call,
the kernels above in the order and with the roundings of the model's Python code
(``decoder_layers``; ``LlamaForCausalLM.forward`` decides when).

``csrc/woq_gemm_cpu.c`` multiplies bf16 activations by int8/int4 weight codes with AVX-512 BF16,
or in float32 with AVX2 + FMA (``woq_gemm``; ``NativeQuantLinear`` in ``pagedq.quant.linear``):
torch's weight-only kernels convert the weight again every few rows and fall behind a bf16 GEMM
from ~8 rows on.

The library is compiled once per source version and CPU (``-march=native``) into
``$PAGEDQ_CACHE/native``, its files in parallel, and loaded with ctypes (which releases the GIL
during the call). On CPU the engine begins that build in a background thread (``start_build``)
before it loads the tokenizer and the weights: a cold start waits only for what is left of it.
Without a C compiler, or with ``PAGEDQ_CPU_KERNELS=torch``, pagedq uses the torch
implementation instead; both are tested against each other.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Any

import torch

logger = logging.getLogger(__name__)

_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
# The translation units, the slowest to compile first: the build compiles them in parallel (one
# per core), so a cold start waits for about their sum over the cores, not for the sum (2-core
# Xeon: the attention's grouped rows 2.8 s, the quantized GEMMs 2.0 s, the other seven 5 s
# together; one after another, with one attention file of 7.4 s and each file's kernel
# instances inlined into one function, the build took 12.8 s of a 16-s cold start).
_SRCS = [
    os.path.join(_CSRC, name)
    for name in (
        "paged_attention_rows_cpu.c",
        "woq_gemm_cpu.c",
        "paged_attention_cpu.c",
        "paged_attention_lanes_cpu.c",
        "gemv_cpu.c",
        "elementwise_cpu.c",
        "decoder_cpu.c",
        "amx_gemm_cpu.c",
        "amx_attention_cpu.c",
    )
]
_HEADERS = [os.path.join(_CSRC, name) for name in ("cpu_math.h", "paged_attention_cpu.h")]
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
_builder: threading.Thread | None = None  # start_build's thread
_builder_lock = threading.Lock()  # guards _builder only: _lock is held for a whole build
_build_seconds: float | None = None  # what this process spent compiling the library (build_seconds)


def _after_fork_in_child() -> None:
    """A process forked during a background build inherits the lock held by a thread it does
    not have: the child starts over (it builds itself, or finds the parent's library cached)."""
    global _lock, _builder, _builder_lock
    _lock, _builder_lock = threading.Lock(), threading.Lock()
    _builder = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

_FUNCS = {torch.float32: "paged_attention_f32", torch.bfloat16: "paged_attention_bf16"}
_KV_KIND = {torch.int8: 1, torch.uint8: 2}  # else 0: the cache holds the query's dtype


def _cache_dir() -> str:
    root = os.environ.get("PAGEDQ_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "pagedq"))
    return os.path.join(root, "native")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (empty where /proc/cpuinfo is unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        line = ""
    return frozenset(line.partition(":")[2].split())


def _cpu_id() -> str:
    return platform.machine() + " ".join(sorted(cpu_flags()))


def _cores() -> int:
    """The cores this process may run on (its affinity, where the OS reports one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# PAGEDQ_CPU_ISA: what the kernels are compiled for. ``native`` uses every extension of this
# CPU; ``avx2`` leaves AVX-512 (and with it AVX-512 BF16) and AMX out, so that a machine that has them
# runs and tests the AVX2 paths too (each choice is its own cached library).
_ISA_FLAGS = {"native": [], "avx2": ["-mno-avx512f", "-mno-amx-tile", "-mno-amx-bf16", "-mno-amx-int8"]}


def _isa_flags() -> list[str]:
    isa = os.environ.get("PAGEDQ_CPU_ISA", "native")
    if isa not in _ISA_FLAGS:
        raise ValueError(f"PAGEDQ_CPU_ISA={isa!r}: allowed values are {', '.join(_ISA_FLAGS)}")
    return _ISA_FLAGS[isa]


def _compile(cc: str, compile_flags: list[str], out: str) -> subprocess.CompletedProcess | None:
    """Compile every source (in parallel, one compiler per core, in ``_SRCS``' order) and link
    them into ``out``; the first failed step, or None."""
    with tempfile.TemporaryDirectory(dir=_cache_dir()) as build:
        objs = [os.path.join(build, os.path.basename(src) + ".o") for src in _SRCS]
        compiles = [[cc, *compile_flags, "-c", src, "-o", obj] for src, obj in zip(_SRCS, objs)]
        with concurrent.futures.ThreadPoolExecutor(min(len(compiles), _cores())) as pool:
            procs = list(pool.map(lambda cmd: subprocess.run(cmd, capture_output=True, text=True), compiles))
        failed = next((p for p in procs if p.returncode != 0), None)
        if failed is None:
            link = subprocess.run([cc, *_LINK_FLAGS, *objs, "-o", out, "-lm"], capture_output=True, text=True)
            failed = link if link.returncode != 0 else None
        return failed


def _build() -> ctypes.CDLL | None:
    global _build_seconds
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        logger.warning("no C compiler found: the native CPU kernels are off, attention uses the torch path")
        return None
    compile_flags = _FLAGS + _isa_flags()
    src = b"".join(_read(p) for p in [*_SRCS, *_HEADERS])
    flags = " ".join(compile_flags + _LINK_FLAGS).encode()
    key = hashlib.sha256(src + flags + _cpu_id().encode()).hexdigest()[:16]
    path = os.path.join(_cache_dir(), f"libpagedq_cpu_{key}.so")
    if not os.path.isfile(path):
        os.makedirs(_cache_dir(), exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=_cache_dir())
        os.close(fd)
        t0 = time.perf_counter()
        failed = _compile(cc, compile_flags, tmp)
        if failed is not None:
            with contextlib.suppress(FileNotFoundError):  # a failed link removes its output
                os.unlink(tmp)
            logger.warning(
                "building the native CPU kernels failed, using the torch path:\n%s", failed.stderr[-2000:]
            )
            return None
        os.replace(tmp, path)  # atomic: concurrent builders never load a half-written file
        _build_seconds = time.perf_counter() - t0
    lib = ctypes.CDLL(path)
    for name in _FUNCS.values():
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = (
            [ctypes.c_void_p] * 10 + [ctypes.c_int] * 7 + [ctypes.c_float, ctypes.c_int, ctypes.c_int]
        )
    for suffix in ("f32", "bf16"):
        norm = getattr(lib, f"add_rms_norm_{suffix}")
        norm.restype = None
        norm.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 2 + [ctypes.c_float, ctypes.c_int]
        rope = getattr(lib, f"rope_cache_{suffix}")
        rope.restype = None
        rope.argtypes = [ctypes.c_void_p] + [ctypes.c_int] * 4 + [ctypes.c_void_p] * 6 + [ctypes.c_int]
    for suffix in ("f32", "bf16", "f32r"):
        silu = getattr(lib, f"silu_mul_{suffix}")
        silu.restype = None
        silu.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int] * 3
    for suffix in ("f32", "bf16"):
        fn = getattr(lib, f"argmax_rows_{suffix}")
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int] * 2 + [ctypes.c_int64, ctypes.c_int]
    lib.gemv.restype = ctypes.c_int
    lib.gemv.argtypes = (
        [ctypes.c_void_p]
        + [ctypes.c_int] * 3
        + [ctypes.c_void_p]
        + [ctypes.c_int] * 2
        + [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int,
        ]
    )
    lib.amx_available.restype = ctypes.c_int
    lib.amx_available.argtypes = []
    lib.amx_prompt_attention_bf16.restype = ctypes.c_int
    attention_args: list[Any] = (
        [ctypes.c_void_p, ctypes.c_int64] * 4
        + [ctypes.c_void_p] * 2
        + [ctypes.c_int] * 5
        + [ctypes.c_float, ctypes.c_int, ctypes.c_int]
    )
    lib.amx_prompt_attention_bf16.argtypes = attention_args
    lib.decoder_layers.restype = ctypes.c_int
    lib.decoder_layers.argtypes = [
        ctypes.POINTER(LayerPtrs), ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(StepArgs),
    ]  # fmt: skip
    lib.woq_available.restype = ctypes.c_int
    lib.woq_available.argtypes = []
    lib.woq_set_amx.restype = ctypes.c_int
    lib.woq_set_amx.argtypes = [ctypes.c_int]
    lib.woq_isa.restype = ctypes.c_char_p
    lib.woq_isa.argtypes = []
    lib.woq_gemm_bf16.restype = ctypes.c_int
    woq_args: list[Any] = (
        [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
        + [ctypes.c_void_p] * 2
        + [ctypes.c_int] * 2
        + [ctypes.c_void_p]
        + [ctypes.c_int] * 3
    )
    lib.woq_gemm_bf16.argtypes = woq_args
    lib.woq_dequant_bf16.restype = None
    dequant_args: list[Any] = [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 2 + [ctypes.c_int] * 4
    lib.woq_dequant_bf16.argtypes = [*dequant_args, ctypes.c_void_p, ctypes.c_int]
    return lib


class QuantPtrs(ctypes.Structure):
    """A projection held as int8/int4 codes for ``decoder_layers`` (``QuantPtrs`` of
    csrc/decoder_cpu.c): ``woq_gemm``'s tensors, the act-order ``perm`` (int64) and a bf16 bias."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("codes", "scales", "zeros", "perm", "bias")] + [
        (name, ctypes.c_int64) for name in ("bits", "group", "kc", "np")
    ]


_LAYER_FIELDS: Any = [
    (name, ctypes.c_void_p)
    for name in ("ln1", "ln2", "w_qkv", "b_qkv", "w_o", "w_gate_up", "w_down", "k_cache", "v_cache")
] + [("w_kind", ctypes.c_int64), ("window", ctypes.c_int64), ("q", ctypes.c_void_p * 4)]


class LayerPtrs(ctypes.Structure):
    """One decoder layer's tensors for ``decoder_layers`` (``LayerPtrs`` of csrc/decoder_cpu.c);
    ``q``: pointers to the :class:`QuantPtrs` of qkv, o, gate_up, down where those are quantized."""

    _fields_ = _LAYER_FIELDS


_STEP_INTS = ("m", "hidden", "inter", "H", "KVH", "D", "BS", "B", "MAXB", "nthreads")
_STEP_PTRS = (
    "positions",
    "slots",
    "block_tables",
    "query_start",
    "query_lens",
    "context_lens",
    "cos_t",
    "sin_t",
    "prompt_starts",
    "prompt_lens",
)


class StepArgs(ctypes.Structure):
    """One step's shapes and attention metadata (``StepArgs`` of csrc/decoder_cpu.c)."""

    _fields_ = (
        [(n, ctypes.c_int64) for n in _STEP_INTS]
        + [("eps", ctypes.c_float), ("scale", ctypes.c_float)]
        + [(n, ctypes.c_void_p) for n in _STEP_PTRS]
        + [("n_prompts", ctypes.c_int64)]
    )


def decoder_layers(layers: ctypes.Array, x: torch.Tensor, args: StepArgs) -> None:
    """Run ``layers`` (an array of :class:`LayerPtrs`) over the residual stream ``x`` [m, hidden]
    in place (``csrc/decoder_cpu.c``); ``args`` holds the step's pointers, kept alive by the caller."""
    lib = library()
    if lib is None:
        raise RuntimeError("the native CPU kernels are not available")
    if lib.decoder_layers(
        layers, len(layers), x.data_ptr(), int(x.dtype == torch.bfloat16), ctypes.byref(args)
    ):
        raise MemoryError("decoder_layers: no memory for the step's scratch")


def _kernels_off() -> bool:
    """``PAGEDQ_CPU_KERNELS=torch``: the torch paths everywhere, nothing built."""
    return os.environ.get("PAGEDQ_CPU_KERNELS", "native") == "torch"


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they are off or cannot be built."""
    global _lib, _tried
    if _kernels_off():
        return None
    if not _tried:
        with _lock:
            if not _tried:
                _lib = _build()
                _tried = True
    return _lib


def build_seconds() -> float | None:
    """Seconds this process spent compiling the library, or None where it found it compiled (or
    has not asked for it): ``%pagedq load`` says so when a load paid for the compile."""
    return _build_seconds


def start_build() -> None:
    """Build (or load) the library in a background thread and return at once.

    A cold start compiles the kernels (seconds); started before the weights load, the compile
    runs while they do, and the first :func:`library` call waits only for what is left (it
    takes the build's lock). Does nothing where the kernels are off, already tried or being
    built; never waits for a build in progress.
    """
    global _builder
    if _kernels_off():
        return
    with _builder_lock:
        if _tried or _builder is not None:
            return
        _builder = threading.Thread(target=library, name="pagedq-native-build", daemon=True)
        _builder.start()


def supports(query: torch.Tensor, k_cache: torch.Tensor) -> bool:
    return (
        query.device.type == "cpu"
        and query.dtype in _FUNCS
        and k_cache.dtype in (query.dtype, *_KV_KIND)
        and k_cache.is_contiguous()
        and library() is not None
    )


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    query_lens: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    window: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The queries of a step against their sequences' blocks (``csrc/paged_attention_cpu.c``).

    ``query`` [T, H, D]; ``block_tables`` [B, max_blocks] int64; ``query_start``,
    ``query_lens`` [B] int64 (sequence b's rows of ``query``); ``context_lens`` [B] int64 (keys
    in the cache, the new ones included); ``k_scale``/``v_scale``: the float16 scales of an int8
    cache. Writes those rows of ``out`` (a new tensor by default) and leaves the others.
    """
    lib = library()
    if lib is None:
        raise RuntimeError("the native CPU kernels are not available (see supports)")
    kind = _KV_KIND.get(k_cache.dtype, 0)
    if kind == 1 and (k_scale is None or v_scale is None):
        raise ValueError("an int8 KV cache needs its scales")
    q = query.contiguous()
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError("out must be a contiguous tensor of the query's shape and dtype")
    _, h, d = q.shape
    _, bs, kvh, _ = k_cache.shape
    scales: tuple[int | None, int | None] = (None, None)
    if kind == 1 and k_scale is not None and v_scale is not None:
        scales = (k_scale.data_ptr(), v_scale.data_ptr())
    status = getattr(lib, _FUNCS[q.dtype])(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), *scales, block_tables.data_ptr(),
        query_start.data_ptr(), query_lens.data_ptr(), context_lens.data_ptr(), out.data_ptr(),
        kind, context_lens.shape[0], h, kvh, d, bs, block_tables.shape[1],
        float(scale), int(window), torch.get_num_threads(),
    )  # fmt: skip
    if status:
        raise MemoryError("paged_attention: no memory for the step's task list or scratch")
    return out


_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


def elementwise_supports(x: torch.Tensor, weight: torch.Tensor | None = None) -> bool:
    """Whether the fused elementwise kernels take ``x`` (and ``weight``, of the same dtype)."""
    return (
        x.device.type == "cpu"
        and x.dtype in _SUFFIX
        and x.is_contiguous()
        and (weight is None or (weight.dtype == x.dtype and weight.is_contiguous()))
        and library() is not None
    )


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(res, weight * rms_norm(res))`` with ``res = x + delta`` (``x`` itself without a delta),
    normalised over the last dimension as transformers' LlamaRMSNorm does."""
    lib = library()
    if lib is None:
        raise RuntimeError("the native CPU kernels are not available (see elementwise_supports)")
    n = x.shape[-1]
    out = torch.empty_like(x)
    res = x
    if delta is not None:
        delta = delta.contiguous()
        if delta.shape != x.shape or delta.dtype != x.dtype:
            raise ValueError(
                f"delta must be like x {tuple(x.shape)} {x.dtype}, got {tuple(delta.shape)} {delta.dtype}"
            )
        res = torch.empty_like(x)
    getattr(lib, f"add_rms_norm_{_SUFFIX[x.dtype]}")(
        x.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(),
        res.data_ptr(), out.data_ptr(), x.numel() // n, n, float(eps), torch.get_num_threads(),
    )  # fmt: skip
    return res, out


def silu_mul(gate_up: torch.Tensor, round_bf16: bool = False) -> torch.Tensor:
    """``silu(gate) * up`` of rows ``[gate | up]`` (``[..., 2 * I]`` -> ``[..., I]``).

    ``round_bf16`` (float32 ``gate_up`` only): the bf16 result of a bf16 model whose GEMMs run in
    float32 — ``gate_up`` rounded to bf16 as it is read, the result bf16 values held in float32,
    bit for bit the bf16 kernel's on ``gate_up.bfloat16()`` — so that neither side of the MLP
    converts."""
    lib = library()
    if lib is None:
        raise RuntimeError("the native CPU kernels are not available (see elementwise_supports)")
    if round_bf16 and gate_up.dtype != torch.float32:
        raise ValueError(f"silu_mul: round_bf16 takes a float32 gate_up, got {gate_up.dtype}")
    inter = gate_up.shape[-1] // 2
    out = gate_up.new_empty(*gate_up.shape[:-1], inter)
    rows = gate_up.numel() // (2 * inter) if inter else 0
    suffix = "f32r" if round_bf16 else _SUFFIX[gate_up.dtype]
    getattr(lib, f"silu_mul_{suffix}")(
        gate_up.data_ptr(), out.data_ptr(), rows, inter, torch.get_num_threads()
    )
    return out


def argmax_supports(x: torch.Tensor) -> bool:
    """Whether :func:`argmax_rows` takes ``x``: a 2-D float32 or bf16 CPU tensor with unit stride
    in rows."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.dim() == 2
        and x.stride(1) == 1
        and x.shape[1] > 0
        and library() is not None
    )


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)`` (int64) for ``x`` [rows, n] as :func:`argmax_supports` takes it: the
    first index of each row's largest value, a NaN counting as the largest."""
    lib = library()
    if lib is None:
        raise RuntimeError("the native CPU kernels are not available (see argmax_supports)")
    out = torch.empty(x.shape[0], dtype=torch.int64)
    fn = lib.argmax_rows_bf16 if x.dtype == torch.bfloat16 else lib.argmax_rows_f32
    fn(x.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], x.stride(0), torch.get_num_threads())
    return out


def rope_cache(
    qkv: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> None:
    """Rotate the Q and K heads of ``qkv`` [T, (H + 2 KVH) * D] in place (rotate-half rope, the
    ``cos``/``sin`` tables [positions, D] of the model's dtype) and write K and V to their cache
    slots (``k_cache``/``v_cache`` [..., KVH, D] of that dtype, contiguous)."""
    lib = library()
    if lib is None:
        raise RuntimeError("the native CPU kernels are not available (see rope_cache_supports)")
    t = qkv.shape[0]
    d = cos.shape[-1]
    getattr(lib, f"rope_cache_{_SUFFIX[qkv.dtype]}")(
        qkv.data_ptr(), t, num_heads, num_kv_heads, d, positions.data_ptr(), cos.data_ptr(), sin.data_ptr(),
        slot_mapping.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip


def rope_cache_supports(qkv: torch.Tensor, cos: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether :func:`rope_cache` serves this layer: CPU, float32 or bf16 throughout (a cache of
    the model's dtype: int8/fp8 caches quantize through torch), contiguous, built."""
    return (
        qkv.device.type == "cpu"
        and qkv.dtype in _SUFFIX
        and qkv.is_contiguous()
        and cos.dtype == qkv.dtype
        and k_cache.dtype == qkv.dtype
        and k_cache.is_contiguous()
        and library() is not None
    )


def gemv_supports(weight: torch.Tensor) -> bool:
    """Whether :func:`gemv` can multiply by ``weight`` here (a CPU float32 or bf16 matrix, built)."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.bfloat16)
        and weight.dim() == 2
        and library() is not None
    )


PANEL = 16  # output rows per panel of :func:`panels` (csrc/gemv_cpu.c's PANEL)


def panels(weight: torch.Tensor) -> torch.Tensor:
    """``weight [n, k]`` laid out for :func:`gemv`: panels of 16 output rows, k-major
    (``[ceil(n / 16), k, 16]``, the last panel padded with zeros), in the weight's dtype. A
    panel streams as one sequential read, and per k its 16 weights meet every input row."""
    n, k = weight.shape
    padded = -(-n // PANEL) * PANEL
    w = weight.detach()
    if padded != n:
        w = torch.cat([w, w.new_zeros(padded - n, k)])
    return w.reshape(padded // PANEL, PANEL, k).transpose(1, 2).contiguous()


def amx_supported() -> bool:
    """Whether the AMX tile kernel runs here: built for a CPU with AMX-BF16 (not with
    ``PAGEDQ_CPU_ISA=avx2``) and the kernel granted the process the tile state."""
    lib = library()
    return lib is not None and bool(lib.amx_available())


def prompt_attention_fits(heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether :func:`prompt_attention` (and the native decoder stack's fresh prompts) serve
    this head layout in bf16 here: a CPU with AMX, head_dim a multiple of 32 up to 256, whole
    groups of query heads per KV head."""
    return (
        head_dim % 32 == 0
        and 0 < head_dim <= 256
        and kv_heads > 0
        and heads % kv_heads == 0
        and amx_supported()
    )


def prompt_attention_supports(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether :func:`prompt_attention` takes these ``[tokens, heads, head_dim]`` views: bf16,
    :func:`prompt_attention_fits` their heads, heads contiguous within a row (rows may be
    strided: views of a fused QKV output)."""
    d = query.shape[-1]
    return (
        query.device.type == "cpu"
        and query.dim() == key.dim() == value.dim() == 3
        and query.dtype == key.dtype == value.dtype == torch.bfloat16
        and key.shape[-1] == value.shape[-1] == d
        and key.shape[1] == value.shape[1]
        and all(t.stride(2) == 1 and t.stride(1) == d for t in (query, key, value))
        and prompt_attention_fits(query.shape[1], key.shape[1], d)
    )


def prompt_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    starts: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    window: int,
    out: torch.Tensor,
) -> None:
    """Causal attention of fresh prompts over their own K/V, into ``out`` (csrc/amx_attention_cpu.c):
    prompt ``i`` is rows ``starts[i] .. starts[i] + lens[i]`` (int64 tensors) of ``query``
    ``[T, H, D]`` and of ``key``/``value`` ``[T, KVH, D]`` as :func:`prompt_attention_supports`
    takes them; ``window`` > 0 limits each query to its last ``window`` keys. Rows of ``out``
    (``[T, H, D]`` bf16, heads contiguous) outside the prompts are left as they are."""
    lib = library()
    if lib is None or not prompt_attention_supports(query, key, value):
        raise RuntimeError(
            "prompt_attention: not available for these tensors (see prompt_attention_supports)"
        )
    if (
        out.dtype != torch.bfloat16
        or out.shape != query.shape
        or out.stride(2) != 1
        or out.stride(1) != query.shape[2]
    ):
        raise ValueError("prompt_attention: out must be bf16 of the query's shape, heads contiguous")
    starts, lens = starts.contiguous(), lens.contiguous()
    if (
        starts.dtype != torch.int64
        or lens.dtype != torch.int64
        or starts.shape != lens.shape
        or lens.dim() != 1
    ):
        raise ValueError("prompt_attention: starts and lens must be int64 vectors of one length")
    t, h, d = query.shape
    if key.shape[0] != t or value.shape[0] != t:
        raise ValueError("prompt_attention: query, key and value must have the same rows")
    status = lib.amx_prompt_attention_bf16(
        query.data_ptr(), query.stride(0), key.data_ptr(), key.stride(0), value.data_ptr(), value.stride(0),
        out.data_ptr(), out.stride(0), starts.data_ptr(), lens.data_ptr(), lens.numel(), t, h, key.shape[1], d,
        float(scale), int(window), torch.get_num_threads(),
    )  # fmt: skip
    if status == -4:
        raise ValueError(f"prompt_attention: every prompt must be a non-empty range of the {t} rows")
    if status == -1:
        raise MemoryError("prompt_attention: no memory for the packed K/V or a thread's scratch")
    if status:
        raise RuntimeError(f"prompt_attention: the kernel refused the call (status {status})")


AMX_BLOCK = 32  # outputs per pair of tile columns and inputs per k block (csrc/amx_gemm_cpu.c)


def amx_tiles(weight: torch.Tensor) -> torch.Tensor:
    """bf16 ``weight [n, k]`` laid out for the AMX kernel of :func:`gemv`: zero-padded to
    multiples of 32 outputs and inputs, as ``[n/32, k/32, 2, 16, 16, 2]`` -- per pair of
    16-output blocks and per 32-wide k block, two 1 KB B tiles in the VNNI order ``tdpbf16ps``
    reads (16 input pairs x 16 outputs x 2). A pair's tiles are one sequential read."""
    n, k = weight.shape
    np_, kp = -(-n // AMX_BLOCK) * AMX_BLOCK, -(-k // AMX_BLOCK) * AMX_BLOCK
    w = weight.detach().to(torch.bfloat16)
    if (np_, kp) != (n, k):
        w = torch.nn.functional.pad(w, (0, kp - k, 0, np_ - n))
    return w.reshape(np_ // AMX_BLOCK, 2, 16, kp // AMX_BLOCK, 16, 2).permute(0, 3, 1, 4, 2, 5).contiguous()


# What the C code reads a weight as (``gemv``'s w_kind): panels of float32 or bf16, AMX tiles.
W_F32_PANELS, W_BF16_PANELS, W_AMX_TILES = 0, 1, 2


def weight_kind(weight: torch.Tensor) -> int:
    """The layout of ``weight`` as the C code names it: :func:`panels` of float32 or bf16, or
    :func:`amx_tiles` (6-D); ValueError for anything else."""
    if weight.dim() == 6 and weight.shape[2:] == (2, 16, 16, 2) and weight.dtype == torch.bfloat16:
        return W_AMX_TILES
    if weight.dim() == 3 and weight.shape[2] == PANEL and weight.dtype in (torch.float32, torch.bfloat16):
        return W_BF16_PANELS if weight.dtype == torch.bfloat16 else W_F32_PANELS
    raise ValueError(
        f"gemv: the weight must be laid out by panels() or amx_tiles(), got {weight.dtype} {tuple(weight.shape)}"
    )


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """``x [m, k] @ W[n, k].T + bias`` for up to a few dozen rows, in ``x``'s dtype with float32
    accumulation; ``weight`` is W as :func:`panels` lays it out (float32 or bf16, read as it
    is) or as :func:`amx_tiles` does (bf16 ``x`` only, where :func:`amx_supported`), ``bias``
    float32 or None."""
    lib = library()
    if lib is None:
        raise RuntimeError("the native CPU kernels are not available (see gemv_supports)")
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or x.dim() != 2:
        raise ValueError(f"gemv: x must be a 2-D float32 or bf16 CPU tensor, got {x.dtype} {tuple(x.shape)}")
    kind = weight_kind(weight)
    x, weight = x.contiguous(), weight.contiguous()
    m, k = x.shape
    # outputs per weight.shape[0] index, inputs per weight.shape[1] index
    block, k_per = (AMX_BLOCK, AMX_BLOCK) if kind == W_AMX_TILES else (PANEL, 1)
    blocks = weight.shape[0]
    if not 0 < n <= blocks * block or n <= (blocks - 1) * block:
        raise ValueError(f"gemv: n={n} does not fit a weight of {blocks} panels of {block}")
    wk = weight.shape[1] * k_per
    if (kind == W_AMX_TILES and not wk - AMX_BLOCK < k <= wk) or (kind != W_AMX_TILES and wk != k):
        raise ValueError(f"gemv: x has {k} features, the weight {wk}")
    if kind == W_AMX_TILES and x.dtype != torch.bfloat16:
        raise ValueError(f"gemv: a weight in AMX tiles takes bf16 inputs, got {x.dtype}")
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError("gemv: bias must be a contiguous float32 vector of the output size")
    y = x.new_empty(m, n)
    status = lib.gemv(
        x.data_ptr(), int(x.dtype == torch.bfloat16), m, k, weight.data_ptr(), kind,
        n, None if bias is None else bias.data_ptr(), y.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if status == -2:
        raise RuntimeError("gemv: the AMX kernel is not available here (see amx_supported)")
    if status:
        raise MemoryError(f"gemv: no memory to widen a {m} x {k} input")
    return y


def woq_supported() -> bool:
    """Whether the weight-only-quantized GEMM can run here (built, and the CPU has AVX-512 BF16 or
    AVX2 + FMA)."""
    lib = library()
    return lib is not None and bool(lib.woq_available())


def woq_isa() -> str | None:
    """The instruction set the weight-only-quantized GEMM was built for (``avx512bf16``;
    ``avx512``: its float32 path on AVX-512 without BF16; or ``avx2``), None where it is not
    available (see ``PAGEDQ_CPU_ISA``)."""
    lib = library()
    if lib is None or not lib.woq_available():
        return None
    return lib.woq_isa().decode()


def set_woq_amx(on: bool) -> bool:
    """Whether :func:`woq_gemm` runs calls of 8 rows or more on AMX tiles where it can (the
    default on an AMX CPU) or on the vdpbf16ps tiles; returns the previous setting. For tests and
    A/B measurements: both paths stay tested on one machine."""
    lib = library()
    if lib is None:
        return False
    return bool(lib.woq_set_amx(int(bool(on))))


def woq_dequant(
    codes: torch.Tensor,
    bits: int,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group: int,
    k: int,
    out_features: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The weight held as :func:`woq_gemm`'s panel-packed codes, as a dense bf16 matrix, transposed
    (``[k, out_features]``: ``x @ result`` is the product): ``(code - zero) * scale`` with the
    scale rounded to bf16 and one rounding of the product. ``out``: a contiguous bf16 buffer of
    that shape to write into (a fresh multi-MB tensor page-faults on every call)."""
    lib = library()
    if lib is None:
        raise RuntimeError("the native CPU kernels are not available")
    np_ = scales.shape[1]
    if not (
        0 < out_features <= np_
        and k % group == 0
        and scales.shape[0] * group == k
        and zeros.shape == scales.shape
    ):
        raise ValueError(f"woq_dequant: codes of {np_} channels x {k} in groups of {group} do not fit")
    if codes.numel() * (8 // bits) != np_ * k or scales.dtype != torch.float32 or zeros.dtype != torch.uint8:
        raise ValueError("woq_dequant: codes, scales (float32) and zeros (uint8) must be NativeQuantLinear's")
    if out is None:
        out = torch.empty(k, out_features, dtype=torch.bfloat16)
    elif out.shape != (k, out_features) or out.dtype != torch.bfloat16 or not out.is_contiguous():
        raise ValueError(f"woq_dequant: out must be a contiguous bf16 [{k}, {out_features}] tensor")
    lib.woq_dequant_bf16(
        codes.data_ptr(), bits, scales.contiguous().data_ptr(), zeros.contiguous().data_ptr(), group, k,
        out_features, np_, out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return out


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
    if m == 0:  # no rows, nothing to compute (the kernel divides the rows into tiles)
        return y
    status = lib.woq_gemm_bf16(
        x.data_ptr(), m, k, codes.data_ptr(), bits, scales.data_ptr(), zeros.data_ptr(), group, kc,
        y.data_ptr(), out_features, scales.shape[1], torch.get_num_threads(),
    )  # fmt: skip
    if status:
        raise MemoryError(f"woq_gemm: no memory for the scratch of a {m} x {k} input")
    return y
