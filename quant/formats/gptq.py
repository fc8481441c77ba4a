"""GPTQ checkpoints (AutoGPTQ / GPTQModel), 4- and 8-bit, any group size, act-order, v1 and v2.

Layout: ``qweight[K / (32/bits), N]`` int32, codes packed along K, lowest bits first;
``qzeros[G, N / (32/bits)]`` int32 packed along N the same way; ``scales[G, N]`` fp16;
``g_idx[K]`` int32. Format ``gptq`` (v1) stores every zero minus one; ``gptq_v2`` stores it as is.
"""

from __future__ import annotations

import torch

from .base import QuantConfig, QuantWeight, WeightFormat, pack_int32, unpack_int32


def gptq_unpack(tensors: dict[str, torch.Tensor], cfg: QuantConfig) -> QuantWeight:
    bits = cfg.bits
    q = unpack_int32(tensors["qweight"], bits, 0).T.contiguous()  # [N, K]
    zeros = unpack_int32(tensors["qzeros"], bits, 1).float()  # [G, N]
    if cfg.checkpoint_format == "gptq":
        zeros = zeros + 1  # v1 stores zero - 1 (so it cannot hold a zero of 0: that is v2's fix)
    scales = tensors["scales"].float()
    k = q.shape[1]
    g_idx = tensors.get("g_idx")
    if g_idx is None:
        size = k if cfg.group_size == -1 else cfg.group_size
        g_idx = torch.arange(k) // size
    return QuantWeight(q, scales, zeros, g_idx.long(), bits)


def gptq_pack(w: QuantWeight, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    zeros = w.zeros.round().to(torch.int64)
    if checkpoint_format == "gptq":
        if bool((zeros < 1).any()):
            raise ValueError(
                "GPTQ v1 ('gptq') cannot store a zero point of 0; write checkpoint_format='gptq_v2'"
            )
        zeros = zeros - 1
    return {
        "qweight": pack_int32(w.q.T.contiguous(), w.bits, 0),
        "qzeros": pack_int32(zeros, w.bits, 1),
        "scales": w.scales.to(torch.float16),
        "g_idx": w.g_idx.to(torch.int32),
    }


class GptqFormat(WeightFormat):
    name = "gptq"
    leaves = ("qweight", "qzeros", "scales", "g_idx")

    def parse(self, raw: dict) -> QuantConfig:
        bits = int(raw.get("bits", 4))
        if bits not in (4, 8):
            raise ValueError(f"GPTQ with bits={bits} is not supported; pagedq reads 4- and 8-bit GPTQ")
        group = int(raw.get("group_size", 128))
        fmt = str(raw.get("checkpoint_format", raw.get("format", "gptq"))).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(
                f"GPTQ checkpoint_format {fmt!r} is not supported; pagedq reads 'gptq' and 'gptq_v2'"
            )
        sym = raw.get("sym")
        return QuantConfig(
            "gptq",
            bits,
            group,
            True if sym is None else bool(sym),
            bool(raw.get("desc_act", False)),
            fmt,
            raw,
        )

    def unpack(self, tensors, cfg, dtype, device) -> QuantWeight:
        return gptq_unpack(tensors, cfg)

    def pack(self, w: QuantWeight, cfg: QuantConfig) -> dict[str, torch.Tensor]:
        return gptq_pack(w, cfg.checkpoint_format)

    def quantization_config(self, bits: int, group_size: int, sym: bool, desc_act: bool, **extra) -> dict:
        return {
            "quant_method": "gptq",
            "bits": bits,
            "group_size": group_size,
            "sym": sym,
            "desc_act": desc_act,
            "checkpoint_format": "gptq",
            **extra,
        }


GPTQ = GptqFormat()
