"""The canonical quantized weight that every format unpacks to, and the format interface.

Canonical form (:class:`QuantWeight`): integer codes ``q[N, K]`` (output x input channels),
per-group ``scales[G, N]`` and ``zeros[G, N]`` (in code units), and ``g_idx[K]`` naming the
group of every input channel. The real weight is ``(q - zeros[g_idx]) * scales[g_idx]``. Every
execution path (``QuantLinear``) and every writer starts from this form, so a format
(:class:`WeightFormat`) is: read its ``quantization_config``, unpack to this form, pack from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
        n, k = self.q.shape
        return int(n), int(k)

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


class WeightFormat:
    """One checkpoint format (a ``quant_method`` of ``quantization_config``), registered in
    :data:`pagedq.quant.formats.FORMATS`. The model loader and the quantizers use only this.

    ``leaves``: tensor names under a quantized linear (``qweight``, ...); ``marker``: the leaf
    that says a linear is quantized; ``kernel_layout``: the packing the GPU kernel reads as it
    is (``gptq`` or ``awq``).
    """

    name: str = ""
    leaves: tuple[str, ...] = ()
    marker: str = "qweight"
    kernel_layout: str = "gptq"

    def parse(self, raw: dict) -> QuantConfig:
        """Check and normalize a ``quantization_config``; ``ValueError`` saying what is supported."""
        raise NotImplementedError

    def owns(self, leaf: str) -> bool:
        """Whether a checkpoint tensor under a linear (its leaf name) belongs to the quantized layer."""
        return leaf in self.leaves or leaf == "bias"

    def is_quantized(self, tensors: dict) -> bool:
        return self.marker in tensors

    def unpack(self, tensors: dict[str, torch.Tensor], cfg: QuantConfig, dtype: torch.dtype, device):
        """One linear's tensors -> a :class:`QuantWeight` (or a ready layer, for formats that run
        through their own library)."""
        raise NotImplementedError

    def pack(self, w: QuantWeight, cfg: QuantConfig) -> dict[str, torch.Tensor]:
        """The inverse of :meth:`unpack`: a linear's tensors as this format writes them."""
        raise ValueError(f"pagedq does not write {self.name} checkpoints")

    def quantization_config(self, bits: int, group_size: int, sym: bool, desc_act: bool, **extra) -> dict:
        """The ``quantization_config`` a writer puts into config.json."""
        raise ValueError(f"pagedq does not write {self.name} checkpoints")
