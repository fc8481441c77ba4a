"""W4A16 / W8A16 GEMM in Triton: ``y = x @ dequant(W).T`` reading GPTQ- or AWQ-packed weights.

One kernel, two packed layouts (a ``constexpr`` switch), dequantizing tiles in registers:

* GPTQ: ``qweight[K / pf, N]`` int32 (codes packed along K, ``pf = 32 / bits``),
  ``qzeros[G, N / pf]`` packed along N, ``scales[G, N]``, ``g_idx[K]`` — act-order included:
  every K row finds its group through ``g_idx``;
* AWQ: ``qweight[K, N / 8]`` packed along N in the order ``[0, 2, 4, 6, 1, 3, 5, 7]``,
  ``qzeros[K / g, N / 8]`` alike, ``scales[K / g, N]``.

Zeros are in code units (GPTQ v1's minus-one offset is removed when the layer is built).
Each program computes a ``BLOCK_M x BLOCK_N`` tile and walks K in ``BLOCK_K`` steps. The
products accumulate in float32; under ``TRITON_INTERPRET=1`` the operands of ``tl.dot`` are
float32 too (the interpreter's half-precision dot is wrong), on a GPU they stay 16-bit.
Tile sizes come from ``triton.autotune`` on a GPU (keyed by M, N, K) and are fixed and small
in the interpreter.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in (
        (16, 64, 64, 4, 3),  # decode: few rows, stream the weight
        (16, 128, 64, 4, 4),
        (32, 64, 128, 4, 3),
        (64, 128, 64, 8, 3),  # prefill: square tiles
        (128, 128, 32, 8, 3),
    )
]


def _quant_matmul_kernel_body(
    x_ptr, qw_ptr, qz_ptr, s_ptr, g_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_qw0, stride_qw1, stride_qz0, stride_qz1, stride_s0, stride_s1,
    stride_ym, stride_yn,
    BITS: tl.constexpr, AWQ: tl.constexpr, GROUP: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    PF: tl.constexpr = 32 // BITS
    MAXQ: tl.constexpr = (1 << BITS) - 1
    if AWQ:
        # column n sits in nibble (n % 8 // 2) + 4 * (n % 2) of word n // 8
        n_shift = ((offs_n % 8) // 2 + (offs_n % 2) * 4) * 4
        n_word = offs_n // 8
    else:
        n_shift = (offs_n % PF) * BITS
        n_word = offs_n // PF
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        wmask = mask_k[:, None] & mask_n[None, :]
        if AWQ:
            words = tl.load(
                qw_ptr + offs_k[:, None] * stride_qw0 + n_word[None, :] * stride_qw1, mask=wmask, other=0
            )
            q = (words >> n_shift[None, :]) & MAXQ
            g = offs_k // GROUP
        else:
            words = tl.load(
                qw_ptr + (offs_k // PF)[:, None] * stride_qw0 + offs_n[None, :] * stride_qw1,
                mask=wmask,
                other=0,
            )
            q = (words >> ((offs_k % PF) * BITS)[:, None]) & MAXQ
            g = tl.load(g_ptr + offs_k, mask=mask_k, other=0)
        zw = tl.load(qz_ptr + g[:, None] * stride_qz0 + n_word[None, :] * stride_qz1, mask=wmask, other=0)
        z = (zw >> n_shift[None, :]) & MAXQ
        s = tl.load(s_ptr + g[:, None] * stride_s0 + offs_n[None, :] * stride_s1, mask=wmask, other=0.0)
        w = (q - z).to(tl.float32) * s.to(tl.float32)  # [BLOCK_K, BLOCK_N]
        if DOT_F32:
            acc += tl.dot(x.to(tl.float32), w)
        else:
            acc += tl.dot(x, w.to(x.dtype))
    y = acc.to(y_ptr.dtype.element_ty)
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
        y,
        mask=mask_m[:, None] & mask_n[None, :],
    )


_kernel_fixed = triton.jit(_quant_matmul_kernel_body)
_kernel_tuned = triton.autotune(configs=_GPU_CONFIGS, key=["M", "N", "K"])(
    triton.jit(_quant_matmul_kernel_body)
)


def quant_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    bits: int,
    group_size: int,
    awq: bool,
    n: int,
) -> torch.Tensor:
    """``x[M, K] @ W.T`` for a packed ``W[n, K]`` (see the module docstring for the layouts)."""
    m, k = x.shape
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if g_idx is None:
        g_idx = torch.zeros(1, dtype=torch.int32, device=x.device)  # unused with AWQ
    args = (
        x, qweight, qzeros, scales, g_idx, y, m, n, k,
        x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), qzeros.stride(0), qzeros.stride(1),
        scales.stride(0), scales.stride(1), y.stride(0), y.stride(1),
    )  # fmt: skip
    dot_f32 = INTERPRET or x.dtype == torch.float32
    if INTERPRET or x.device.type == "cpu":
        bm, bn, bk = 16, 32, 32
        fixed_grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
        _kernel_fixed[fixed_grid](
            *args, BITS=bits, AWQ=awq, GROUP=group_size, DOT_F32=dot_f32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk
        )
    else:

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))

        _kernel_tuned[grid](*args, BITS=bits, AWQ=awq, GROUP=group_size, DOT_F32=dot_f32)
    return y
