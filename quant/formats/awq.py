"""AWQ checkpoints (AutoAWQ, GEMM version), 4-bit with zero points.

Layout: ``qweight[K, N/8]`` int32, codes packed along N with the nibble order
``[0, 2, 4, 6, 1, 3, 5, 7]``; ``qzeros[K/g, N/8]`` packed the same way; ``scales[K/g, N]``.
GEMV and GEMV_FAST pack differently and are refused with the fix.
"""

from __future__ import annotations

import torch

from .base import QuantConfig, QuantWeight, WeightFormat, pack_int32, unpack_int32

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of a word holds column AWQ_ORDER[i] of its 8
_AWQ_REVERSE = [AWQ_ORDER.index(j) for j in range(8)]


def awq_unpack_cols(packed: torch.Tensor) -> torch.Tensor:
    """AWQ-packed int32 words ``[R, N/8]`` -> 4-bit codes ``[R, N]`` in column order."""
    nib = unpack_int32(packed, 4, 1)  # [R, N] in nibble order
    r, n = nib.shape
    nib = nib.view(r, n // 8, 8)[:, :, _AWQ_REVERSE]
    return nib.reshape(r, n)


def awq_pack_cols(codes: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`awq_unpack_cols`."""
    r, n = codes.shape
    ordered = codes.view(r, n // 8, 8)[:, :, AWQ_ORDER].reshape(r, n)
    return pack_int32(ordered, 4, 1)


def awq_unpack(tensors: dict[str, torch.Tensor], cfg: QuantConfig) -> QuantWeight:
    q = awq_unpack_cols(tensors["qweight"]).T.contiguous()  # [N, K]
    zeros = awq_unpack_cols(tensors["qzeros"]).float()
    scales = tensors["scales"].float()
    k = q.shape[1]
    size = k if cfg.group_size == -1 else cfg.group_size
    return QuantWeight(q, scales, zeros, torch.arange(k) // size, 4)


def awq_pack(w: QuantWeight) -> dict[str, torch.Tensor]:
    return {
        "qweight": awq_pack_cols(w.q.T.contiguous()),
        "qzeros": awq_pack_cols(w.zeros.round().to(torch.uint8)),
        "scales": w.scales.to(torch.float16),
    }


class AwqFormat(WeightFormat):
    name = "awq"
    leaves = ("qweight", "qzeros", "scales")
    kernel_layout = "awq"

    def parse(self, raw: dict) -> QuantConfig:
        version = str(raw.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(
                f"AWQ version {version!r} is not supported; pagedq reads AWQ 'gemm' checkpoints "
                "(GEMV and GEMV_FAST pack their weights differently; re-export with version='gemm')"
            )
        bits = int(raw.get("bits", raw.get("w_bit", 4)))
        if bits != 4:
            raise ValueError(f"AWQ with bits={bits} is not supported; AWQ GEMM checkpoints are 4-bit")
        if not raw.get("zero_point", True):
            raise ValueError(
                "AWQ without zero points is not supported; pagedq reads zero_point=True checkpoints"
            )
        return QuantConfig(
            "awq", 4, int(raw.get("group_size", raw.get("q_group_size", 128))), False, False, "awq", raw
        )

    def unpack(self, tensors, cfg, dtype, device) -> QuantWeight:
        return awq_unpack(tensors, cfg)

    def pack(self, w: QuantWeight, cfg: QuantConfig) -> dict[str, torch.Tensor]:
        return awq_pack(w)

    def quantization_config(self, bits: int, group_size: int, sym: bool, desc_act: bool, **extra) -> dict:
        if bits != 4 or sym or desc_act:
            raise ValueError("AWQ checkpoints are 4-bit, asymmetric, without act-order")
        return {
            "quant_method": "awq",
            "bits": 4,
            "group_size": group_size,
            "zero_point": True,
            "version": "gemm",
        }


AWQ = AwqFormat()
