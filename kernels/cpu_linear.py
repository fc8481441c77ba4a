"""Dense linear layers on CPUs over weights packed once, at load, for oneDNN.

``F.linear`` hands a plain ``[out, in]`` weight to the BLAS on every call, which lays it out
again for its micro-kernel each time; at decode sizes that costs as much as the product (on a
2-core AVX2 machine, measured 2026-11-29: the tied 49152-row LM head took 17 ms at one row and
84 ms at 64 rows through ``F.linear``, 9 and 34 ms packed; gate_up at 16 rows 1.3 → 0.6 ms).
Here the weight is reordered once into oneDNN's blocked layout
(``torch.ops.mkldnn._reorder_linear_weight``) and every call runs
``torch.ops.mkldnn._linear_pointwise`` on it.

The path depends on the CPU, detected at run time:

* ``float32`` weights: packed as they are (any x86 CPU with oneDNN, AVX2 and up);
* ``bfloat16`` weights on a CPU with native bf16 dot products (AVX-512 BF16, AMX, AVX-NE-CONVERT;
  ``bf16_native()``): packed as bf16, oneDNN picks AMX tiles
  where the CPU has them. Where it has AMX (and the native kernels build), calls of up to
  ``AMX_TILE_ROWS`` (512; ``PAGEDQ_CPU_GEMV_ROWS``) rows, or ``NARROW_TILE_ROWS`` (1024) for
  weights of at most ``NARROW_OUTPUTS`` outputs, run our own AMX kernel instead (``native.gemv`` on a copy laid
  out as tiles, ``native.amx_tiles``): oneDNN streamed the weights of a decode step at 12-16
  GB/s and spent ~25 us a call getting there; the tile kernel streams them at ~18-20 (2-core
  Xeon, the 120 GEMMs of a `bench` decode step with cold weights, oneDNN / tiles: 1 row 15-21 /
  11-12 ms, 16 rows 15-26 / 11-12, 32 rows 28 / 17-18; from ~48 rows they are level), and
  it lets the whole decoder stack of a decode step run as one native call (``native.decoder_layers``);
* ``bfloat16`` weights elsewhere (AVX2, or AVX-512 without BF16): bf16 GEMMs are emulated there
  (AVX2: ~15 GFLOP/s whatever the size; AVX-512: ~62, a fifth of float32), so the weight is packed as float32 instead (twice the bytes, ~6x the
  speed); activations are converted at the call and the output rounded back to bf16, which is
  what a bf16 GEMM with float32 accumulation returns.

Where the weight is packed as float32 (the AVX2 path), calls of up to ``PAGEDQ_CPU_GEMV_ROWS``
rows (default 64; 0 turns it off) run the native few-row kernel (``native.gemv``) on a second
copy of the weight laid out in panels of 16 output rows (``native.panels``) instead: one
sequential pass over the weight per call, and from ~16 rows the FMA rate of a GEMM
micro-kernel. Decode steps stream every weight from memory on each call, where oneDNN's packed
GEMM reached ~60% of the bandwidth at one row and stayed behind up to 64 rows (measured on
`bench`, 2-core AVX2, the 120 float32 decoder GEMMs of one step with cold weights, oneDNN /
panels: 1 row 44 / 25 ms, 8 rows 60 / 36, 24 rows 82 / 55, 64 rows 151 / 145); a bf16 model
keeps its panels in bf16 (half the bytes of the float32 packing). Memory: float32 weights twice,
bf16 three times their bytes (the tied LM head too: its panels are a copy); on an AMX CPU a bf16
weight twice (oneDNN's packing and the tiles; the tied LM head three times: `bench` holds 569
MiB of weights).

``PAGEDQ_CPU_LINEAR`` picks a path by hand: ``auto`` (the above), ``onednn`` (bf16 weights
for oneDNN only, no AMX tiles of our own: the path of a bf16 CPU without AMX, so both are tested
on an AMX machine), ``fp32`` (the AVX2 path on any CPU, so it is tested on a bf16-capable
machine too) or ``torch`` (no packing: ``F.linear`` on the plain weight, the reference).
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

import torch

from . import native

MODES = ("auto", "onednn", "fp32", "torch")
GEMV_ROWS = 64
# Calls of up to this many rows run the AMX tile kernel rather than oneDNN, by default (bf16
# weights on an AMX CPU). Past 64 rows the tile kernel is about level with oneDNN's GEMM on
# `bench`'s decoder shapes (the 120 GEMMs of a step, 2-vCPU Xeon: 128 rows 20-24 ms against
# 22-30, 256 36-49 against 33-37, 384 60 against 72, 512 75-82 against 70-75), and it lets the
# whole decoder stack run as one native call, which is what pays: decode steps of 80 sequences
# 82 -> 70 ms, 112 117 -> 98, 160 157 -> 137 (limit 64 -> 256); a served step of 3 decodes and
# a 257-token prompt 86-90 -> 75 ms, 40 decodes and two 200-token prompts 152-185 -> 125-143,
# 100 decodes and a 257-token prompt 195-209 -> 133-155 (limit 256 -> 512; separate processes,
# alternated, medians of 6 steps). At 1024 rows and more oneDNN is 1.4-2x faster (prefill).
AMX_TILE_ROWS = 512
# ... and for weights of at most NARROW_OUTPUTS outputs, calls of up to NARROW_TILE_ROWS rows:
# below 2048 rows oneDNN ran some of `bench`'s narrow GEMMs on one of the two threads (1 thread
# against 2, two runs: 512 rows o_proj 576x576 and down 576x1536 1.0x; 1024 rows qkv 960x576
# 1.0x and 0.43x, down 1.02-1.08x; gate_up 3072x576 1.8-2.0x everywhere). Served mixed steps of
# 770-1040 rows with the narrow three on tiles, alternated in one process: medians 351 -> 314,
# 348 -> 327, 262 -> 239 ms; at 1490 rows the tiles lost (450 -> 738), hence the bound. The
# native decoder stack keeps the smallest of its weights' limits (AMX_TILE_ROWS).
NARROW_OUTPUTS = 1024
NARROW_TILE_ROWS = 1024
# Bumped by every pack(): whoever keeps raw pointers to packed weights or panels (the native
# decoder stack) rebuilds them when it changes.
generation = 0


def rows_bucket(m: int) -> int:
    """The rows a call of ``m`` rows runs with (the extra rows are discarded).

    oneDNN builds, and JIT-compiles, one primitive per input shape (1-8 ms each here) and keeps
    1024 of them; a serving engine meets nearly every row count from 1 to its token budget on
    each of a model's five GEMM shapes, so a run that builds a primitive for each spends its
    first minutes building them (the throughput workload's first run 83 tok/s, its second 126).
    Buckets bound them to ~145 per shape up to 2048 rows: exact up to 64 rows, then 16 buckets
    per doubling (64-128 in steps of 4, 128-256 of 8, ..., 1024-2048 of 64), so the padding is
    under 1/16 of the rows. Padding is not free: 30 decoder layers of ``bench`` in float32 on
    the 2-core AVX2 machine took 106 ms at 33 rows and 163 ms at 48 (where the earlier buckets
    of 16 rounded 33 to), 496 ms at 257 rows and 627 ms at 320 (buckets of 64).
    """
    if m <= 64:
        return m
    step = 1 << ((m - 1).bit_length() - 5)  # 2**(floor(log2(m - 1)) - 4)
    return -(-m // step) * step


# Rows the blocked layout is tuned for; measured on 1-2048 rows, 16-512 all within noise.
_BATCH_HINT = 64


def mode() -> str:
    value = os.environ.get("PAGEDQ_CPU_LINEAR", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"PAGEDQ_CPU_LINEAR must be one of {', '.join(MODES)}; got {value!r}")
    return value


def gemv_rows(tiles: bool = False, out_features: int | None = None) -> int:
    """Calls of at most this many rows run ``native.gemv`` on the weight's panels, or on its AMX
    tiles where ``tiles`` (0: never; a weight of at most ``NARROW_OUTPUTS`` ``out_features``
    keeps them to ``NARROW_TILE_ROWS``); ``PAGEDQ_CPU_GEMV_ROWS`` sets all of them."""
    value = os.environ.get("PAGEDQ_CPU_GEMV_ROWS", "").strip()
    if not value:
        if not tiles:
            return GEMV_ROWS
        narrow = out_features is not None and out_features <= NARROW_OUTPUTS
        return NARROW_TILE_ROWS if narrow else AMX_TILE_ROWS
    if not value.isdigit():
        raise ValueError(f"PAGEDQ_CPU_GEMV_ROWS must be a whole number of rows >= 0 (0: off); got {value!r}")
    return int(value)


@functools.cache
def bf16_native() -> bool:
    """Whether oneDNN runs bf16 GEMMs natively here (AVX-512 BF16, AMX or AVX-NE-CONVERT).

    ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` alone says yes on any x86 CPU with
    AVX-512 BW/VL/DQ, where oneDNN emulates bf16 by converting to float32: on an AVX-512 Xeon
    without AVX-512 BF16 (2 cores, 2026-12-01) `bench`'s four decoder GEMMs ran at 62 GFLOP/s
    in bf16 and 320 as float32 at 256-2048 rows (5x), and 3.5x slower at 16 rows. So on x86
    the CPU must have a bf16 dot-product instruction too."""
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
    except (AttributeError, RuntimeError):
        return False
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True  # Arm: mkldnn's answer is the CPU's bf16 extension
    return (
        torch.cpu._is_avx512_bf16_supported()
        or torch.cpu._is_amx_tile_supported()
        or "avx_ne_convert" in native.cpu_flags()
    )


@dataclass
class PackedWeight:
    """A weight in oneDNN's layout, and what a call converts from and to."""

    weight: torch.Tensor  # opaque mkldnn tensor [out, in]
    bias: torch.Tensor | None  # in compute_dtype
    out_features: int
    in_features: int
    dtype: torch.dtype  # the model's: inputs arrive and outputs leave in it
    compute_dtype: torch.dtype  # the packed weight's
    nbytes: int  # packed, plus the panels
    panels: torch.Tensor | None = None  # the weight as native.panels or native.amx_tiles lay it out
    gemv_rows: int = 0  # calls of at most this many rows run native.gemv on ``panels``
    panel_bias: torch.Tensor | None = None  # the bias in float32, as native.gemv adds it


def compute_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """The dtype a ``dtype`` weight is packed in here, or None when it stays unpacked."""
    if not torch.backends.mkldnn.is_available():
        return None
    m = mode()
    if m == "torch":
        return None
    if dtype == torch.float32:
        return torch.float32
    if dtype == torch.bfloat16:
        return torch.bfloat16 if m in ("auto", "onednn") and bf16_native() else torch.float32
    return None


def pack(weight: torch.Tensor, bias: torch.Tensor | None = None) -> PackedWeight | None:
    """``weight`` [out, in] packed for this CPU, or None where the plain path runs (not a CPU
    tensor, a dtype without a packed path, oneDNN missing, ``PAGEDQ_CPU_LINEAR=torch``)."""
    if weight.device.type != "cpu" or weight.dim() != 2:
        return None
    cdt = compute_dtype(weight.dtype)
    if cdt is None:
        return None
    global generation
    generation += 1
    w = weight.detach().to(cdt).contiguous()
    packed = torch.ops.mkldnn._reorder_linear_weight(w, _BATCH_HINT)
    b = None if bias is None else bias.detach().to(cdt).contiguous()
    out_f, in_f = w.shape
    nbytes = w.numel() * w.element_size()
    panels, tiles = None, cdt == torch.bfloat16 and mode() == "auto" and native.amx_supported()
    rows = gemv_rows(tiles, out_f)
    if rows > 0 and native.gemv_supports(weight):
        if cdt == torch.float32:
            panels = native.panels(weight)
        elif tiles:
            panels = native.amx_tiles(weight)
    if panels is not None:
        nbytes += panels.numel() * panels.element_size()
    return PackedWeight(
        packed, b, out_f, in_f, weight.dtype, cdt, nbytes, panels, rows if panels is not None else 0,
        None if b is None or panels is None else b.float(),
    )  # fmt: skip


def float32_output(p: PackedWeight, rows: int) -> bool:
    """Whether :func:`linear` of ``rows`` rows computes a bf16 weight's product in float32
    (packed as float32, past the few-row kernel), so that ``keep_float32`` saves a rounding pass."""
    return (
        p.dtype == torch.bfloat16
        and p.compute_dtype == torch.float32
        and not (rows <= p.gemv_rows and p.panels is not None)
    )


def linear(x: torch.Tensor, p: PackedWeight, keep_float32: bool = False) -> torch.Tensor:
    """``x [..., in] @ weight.T + bias`` in the model's dtype; with ``keep_float32``, where the
    product ran in float32 (:func:`float32_output`), its float32 result unrounded (a consumer
    that rounds to bf16 as it reads then sees the same values)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, p.in_features)
    if x2.shape[0] == 0:
        return x.new_empty(*lead, p.out_features)
    m = x2.shape[0]
    if m <= p.gemv_rows and p.panels is not None:
        y = native.gemv(x2, p.panels, p.panel_bias, p.out_features)
        return (y if y.dtype == p.dtype else y.to(p.dtype)).reshape(*lead, p.out_features)
    rows = rows_bucket(m)
    if rows != m:
        padded = x2.new_empty(rows, p.in_features, dtype=p.compute_dtype)
        padded[:m] = x2
        padded[m:] = 0
        x2 = padded
    elif x2.dtype != p.compute_dtype or not x2.is_contiguous():
        x2 = x2.to(p.compute_dtype).contiguous()
    y = torch.ops.mkldnn._linear_pointwise(x2, p.weight, p.bias, "none", [], "")
    if rows != m:
        y = y[:m]
    if y.dtype != p.dtype and not (keep_float32 and y.dtype == torch.float32):
        y = y.to(p.dtype)
    return y.reshape(*lead, p.out_features)
