"""Weight formats as the ecosystem writes them, and one canonical form they all unpack to.

Canonical form (:class:`QuantWeight`): integer codes ``q[N, K]`` (output × input channels),
per-group ``scales[G, N]`` and ``zeros[G, N]`` (in code units), and ``g_idx[K]`` naming the
group of every input channel. The real weight is ``(q - zeros[g_idx]) * scales[g_idx]``. Every
execution path (``QuantLinear``) and every writer starts from this form, so a format is just a
pair of functions: unpack to it, pack from it.

Layouts (as AutoGPTQ / GPTQModel / AutoAWQ write them):

* GPTQ: ``qweight[K / (32/bits), N]`` int32, codes packed along K, lowest bits first;
  ``qzeros[G, N / (32/bits)]`` int32 packed along N the same way; ``scales[G, N]`` fp16;
  ``g_idx[K]`` int32. Format ``gptq`` (v1) stores every zero minus one; ``gptq_v2`` stores it
  as is.
* AWQ (GEMM): ``qweight[K, N/8]`` int32, codes packed along N with the nibble order
  ``[0, 2, 4, 6, 1, 3, 5, 7]``; ``qzeros[K/g, N/8]`` packed the same way; ``scales[K/g, N]``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of a word holds column AWQ_ORDER[i] of its 8


@dataclass
class QuantConfig:
    """What ``quantization_config`` says, normalized. ``method``: gptq | awq | bitsandbytes | int8 | int4."""

    method: str
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    checkpoint_format: str = "gptq"  # gptq (v1, zeros minus one) | gptq_v2
    raw: dict | None = None

    @property
    def pack_factor(self) -> int:
        return 32 // self.bits


@dataclass
class QuantWeight:
    """The canonical quantized weight of one linear layer (see the module docstring)."""

    q: torch.Tensor  # [N, K] uint8 codes
    scales: torch.Tensor  # [G, N] float32
    zeros: torch.Tensor  # [G, N] float32, in code units
    g_idx: torch.Tensor  # [K] int64
    bits: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The real weight ``[N, K]``: the reference every kernel is checked against."""
        s = self.scales[self.g_idx].T  # [N, K]
        z = self.zeros[self.g_idx].T
        return ((self.q.float() - z) * s).to(dtype)

    @property
    def regular_group_size(self) -> int | None:
        """The group size if channel ``k`` is in group ``k // size`` for all k (no act-order)."""
        k, g = self.q.shape[1], self.scales.shape[0]
        if k % g:
            return None
        size = k // g
        expected = torch.arange(k, device=self.g_idx.device) // size
        return size if torch.equal(self.g_idx, expected) else None

    @staticmethod
    def cat(parts: list[QuantWeight]) -> QuantWeight:
        """Stack layers that read the same input (q/k/v, gate/up) along the output dim."""
        first = parts[0]
        for p in parts[1:]:
            if (
                p.bits != first.bits
                or not torch.equal(p.g_idx, first.g_idx)
                or p.scales.shape[0] != first.scales.shape[0]
            ):
                raise ValueError("layers with different bits, groups or g_idx cannot be fused")
        return QuantWeight(
            torch.cat([p.q for p in parts]),
            torch.cat([p.scales for p in parts], dim=1),
            torch.cat([p.zeros for p in parts], dim=1),
            first.g_idx,
            first.bits,
        )


# --- detection ------------------------------------------------------------------------------


def read_quant_config(model_dir: str, config: dict) -> QuantConfig | None:
    """The checkpoint's quantization, from ``config.json`` or ``quantize_config.json``; None if dense."""
    raw = config.get("quantization_config")
    side = os.path.join(model_dir, "quantize_config.json")
    if raw is None and os.path.isfile(side):
        with open(side) as f:
            raw = json.load(f)
        raw.setdefault("quant_method", "gptq")
    if raw is None:
        return None
    return parse_quant_config(raw)


def parse_quant_config(raw: dict) -> QuantConfig:
    method = str(raw.get("quant_method", "gptq")).lower()
    if method == "gptq":
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
    if method == "awq":
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
    if method == "bitsandbytes":
        return QuantConfig("bitsandbytes", 4 if raw.get("load_in_4bit") else 8, -1, True, False, "bnb", raw)
    raise ValueError(
        f"quant_method {method!r} is not supported; pagedq reads gptq, awq and bitsandbytes checkpoints"
    )


# --- bit packing -------------------------------------------------------------------------------


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Codes packed lowest-bits-first into int32 words along ``dim`` -> uint8, ``dim`` grown."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    x = packed.unsqueeze(dim + 1) if dim >= 0 else packed.unsqueeze(dim)
    shape = [1] * x.dim()
    shape[dim + 1 if dim >= 0 else dim] = per
    codes = (x >> shifts.view(shape)) & ((1 << bits) - 1)
    out_shape = list(packed.shape)
    out_shape[dim] *= per
    return codes.reshape(out_shape).to(torch.uint8)


def pack_int32(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`unpack_int32`."""
    per = 32 // bits
    c = codes.to(torch.int64)
    shape = list(c.shape)
    if shape[dim] % per:
        raise ValueError(f"dimension {dim} of size {shape[dim]} is not a multiple of {per}")
    shape[dim] //= per
    shape.insert(dim + 1 if dim >= 0 else len(shape) + dim + 1, per)
    c = c.reshape(shape)
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=c.device)
    view = [1] * c.dim()
    view[dim + 1 if dim >= 0 else dim] = per
    words = (c << shifts.view(view)).sum(dim=dim + 1 if dim >= 0 else dim)  # in [0, 2**32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


# --- GPTQ ----------------------------------------------------------------------------------------


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


# --- AWQ ------------------------------------------------------------------------------------------

_AWQ_REVERSE = [AWQ_ORDER.index(j) for j in range(8)]


def _awq_unpack_cols(packed: torch.Tensor) -> torch.Tensor:
    nib = unpack_int32(packed, 4, 1)  # [R, N] in nibble order
    r, n = nib.shape
    nib = nib.view(r, n // 8, 8)[:, :, _AWQ_REVERSE]
    return nib.reshape(r, n)


def _awq_pack_cols(codes: torch.Tensor) -> torch.Tensor:
    r, n = codes.shape
    ordered = codes.view(r, n // 8, 8)[:, :, AWQ_ORDER].reshape(r, n)
    return pack_int32(ordered, 4, 1)


def awq_unpack(tensors: dict[str, torch.Tensor], cfg: QuantConfig) -> QuantWeight:
    q = _awq_unpack_cols(tensors["qweight"]).T.contiguous()  # [N, K]
    zeros = _awq_unpack_cols(tensors["qzeros"]).float()
    scales = tensors["scales"].float()
    k = q.shape[1]
    size = k if cfg.group_size == -1 else cfg.group_size
    return QuantWeight(q, scales, zeros, torch.arange(k) // size, 4)


def awq_pack(w: QuantWeight) -> dict[str, torch.Tensor]:
    return {
        "qweight": _awq_pack_cols(w.q.T.contiguous()),
        "qzeros": _awq_pack_cols(w.zeros.round().to(torch.uint8)),
        "scales": w.scales.to(torch.float16),
    }


UNPACKERS = {"gptq": gptq_unpack, "awq": awq_unpack}
