"""GPTQ (Frantar et al., 2022): quantize a layer's weight columns one at a time, pushing each
column's rounding error onto the columns not yet quantized, weighted by the inverse Hessian
``H = 2 X^T X`` of the layer's calibration inputs.

This is the algorithm of the paper and of AutoGPTQ's ``fasterquant`` — blocks of 128 columns
with lazy batch updates, damping of the Hessian diagonal, optional act-order (columns in
order of decreasing ``diag(H)``, groups formed in that order, recorded in ``g_idx``) — written
for reading, on torch alone.
"""

from __future__ import annotations

import torch

from .formats.base import QuantWeight
from .rtn import group_length, quantize_codes, scale_zero


def hessian(x: torch.Tensor) -> torch.Tensor:
    """``2 X^T X / n`` of calibration inputs ``x[n, K]`` (in float64 for a stable Cholesky)."""
    x = x.double().reshape(-1, x.shape[-1])
    return 2.0 * (x.T @ x) / x.shape[0]


def gptq_quantize(
    weight: torch.Tensor,
    h: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = False,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    min_zero: int = 0,
) -> QuantWeight:
    """Quantize ``weight[N, K]`` given the Hessian ``h[K, K]`` of its inputs.

    ``min_zero=1`` keeps zero points >= 1, which GPTQ's v1 checkpoint format needs.
    """
    n, k = weight.shape
    size = group_length(k, group_size)
    maxq = 2**bits - 1
    w = weight.double().clone()
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    codes = torch.zeros(n, k, dtype=torch.uint8)
    scales = torch.zeros(k // size, n, dtype=torch.float64)
    zeros = torch.zeros(k // size, n, dtype=torch.float64)
    scale = zero = torch.empty(0)  # the grid of the current group, set at its first column
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        w1 = w[:, b0:b1].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if col % size == 0:  # a new group: its grid from the (error-updated) weights
                g = col // size
                block = torch.cat([w1[:, i:], w[:, b1:]], dim=1)[:, :size]
                scale, zero = scale_zero(block.float(), bits, sym)
                zero = zero.clamp(min=min_zero, max=maxq)
                # the checkpoint stores fp16 scales: quantize on the grid that will be read back
                scale = scale.half().float()
                scales[g], zeros[g] = scale.double(), zero.double()
            q = quantize_codes(w1[:, i : i + 1].float(), scale, zero, bits)[:, 0]
            codes[:, col] = q.to(torch.uint8)
            deq = (q - zero) * scale
            d = hinv1[i, i]
            err = (w1[:, i] - deq.double()) / d
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, b1:] -= err1 @ hinv[b0:b1, b1:]

    inv = torch.argsort(perm)
    g_idx = (torch.arange(k) // size)[inv]  # group of original column c: its rank in perm // size
    return QuantWeight(codes[:, inv].contiguous(), scales.float(), zeros.float(), g_idx, bits)
