"""Round-to-nearest quantization: the baseline every smarter quantizer is measured against.

Also the quantize-on-load path: ``LLM(model, quantization="int8")`` (8-bit, per output
channel, symmetric) and ``"int4"`` (4-bit, groups of 128, asymmetric).
"""

from __future__ import annotations

import torch

from .formats.base import QuantWeight

ON_LOAD: dict[str, dict] = {
    "int8": {"bits": 8, "group_size": -1, "sym": True},
    "int4": {"bits": 4, "group_size": 128, "sym": False},
}


def check_on_load(method: object) -> None:
    """``ValueError`` unless ``method`` names a quantize-on-load scheme."""
    if method not in ON_LOAD:
        names = ", ".join(repr(m) for m in ON_LOAD)
        raise ValueError(
            f"quantization must be {names} or None (GPTQ/AWQ checkpoints are detected from config.json), "
            f"got {method!r}"
        )


def scale_zero(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each row of ``w`` (the grid GPTQ's quantizer uses)."""
    maxq = 2**bits - 1
    w = w.float()
    lo = w.min(dim=-1).values.clamp(max=0)
    hi = w.max(dim=-1).values.clamp(min=0)
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = -hi
    empty = (lo == 0) & (hi == 0)
    lo, hi = torch.where(empty, -1.0, lo), torch.where(empty, 1.0, hi)
    scale = (hi - lo) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-lo / scale)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(torch.round(w.float() / scale[..., None]) + zero[..., None], 0, 2**bits - 1)


def group_length(k: int, group_size: int) -> int:
    """Channels per group along K (``group_size=-1``: one group per output channel)."""
    size = k if group_size == -1 else group_size
    if k % size:
        raise ValueError(f"in_features={k} is not a multiple of group_size={size}")
    return size


def rtn(
    weight: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = False, min_zero: int = 0
) -> QuantWeight:
    """Quantize a dense ``[N, K]`` weight group by group along K.

    ``min_zero=1`` keeps zero points >= 1, which GPTQ's v1 checkpoint format needs.
    """
    n, k = weight.shape
    size = group_length(k, group_size)
    groups = weight.float().reshape(n, k // size, size)
    scale, zero = scale_zero(groups, bits, sym)  # [N, G]
    zero = zero.clamp(min=min_zero)
    q = quantize_codes(groups, scale, zero, bits).reshape(n, k).to(torch.uint8)
    return QuantWeight(q, scale.T.contiguous(), zero.T.contiguous(), torch.arange(k) // size, bits)
