"""bitsandbytes checkpoints, as transformers serializes them.

* LLM.int8 (``load_in_8bit``): ``weight`` int8 ``[N, K]`` and ``SCB`` (each row's absmax).
  The real weight is ``weight * SCB / 127``: exactly pagedq's per-channel int8 form, so these
  layers run weight-only as int8 codes (:class:`~pagedq.quant.linear.NativeQuantLinear` in bf16,
  :class:`~pagedq.quant.linear.Int8Linear` otherwise)
  and do not need the bitsandbytes package. (bitsandbytes itself also quantizes the
  activations, with fp16 outlier columns; weight-only keeps the checkpoint's weights exact.)
* 4-bit NF4 / FP4 (``load_in_4bit``), with or without double quantization: the packed
  ``weight`` plus ``weight.absmax``, ``weight.quant_map``, optional ``weight.nested_absmax`` /
  ``weight.nested_quant_map`` and ``weight.quant_state.bitsandbytes__nf4|fp4``. These run
  through the ``bitsandbytes`` package (``pip install 'pagedq[bnb]'``), imported only here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .formats.base import QuantWeight
from .linear import QuantLinear

_MISSING = (
    "this checkpoint holds bitsandbytes 4-bit (NF4/FP4) weights, which run through the bitsandbytes "
    "package; install it with: pip install 'pagedq[bnb]'  (or pip install bitsandbytes)"
)


def require_bnb():
    try:
        import bitsandbytes
    except ImportError as e:
        raise ValueError(_MISSING) from e
    return bitsandbytes


def int8_weight(tensors: dict[str, torch.Tensor]) -> QuantWeight:
    """LLM.int8 ``weight`` + ``SCB`` -> canonical 8-bit codes (zero 128, one group)."""
    cb, scb = tensors["weight"], tensors["SCB"].float()
    if cb.dtype != torch.int8:
        raise ValueError(f"a bitsandbytes 8-bit weight must be int8, got {cb.dtype}")
    n, k = cb.shape
    q = (cb.to(torch.int16) + 128).to(torch.uint8)
    return QuantWeight(
        q, (scb / 127.0)[None, :], torch.full((1, n), 128.0), torch.zeros(k, dtype=torch.long), 8
    )


class Bnb4bitLinear(QuantLinear):
    """A bitsandbytes NF4/FP4 layer: ``bitsandbytes.matmul_4bit`` and ``dequantize_4bit``."""

    packed: torch.Tensor

    def __init__(
        self, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None, dtype: torch.dtype, device
    ):
        bnb = require_bnb()
        state = {k[len("weight.") :]: v for k, v in tensors.items() if k.startswith("weight.")}
        qs = bnb.functional.QuantState.from_dict(state, device=device)
        n, k = qs.shape
        super().__init__(k, n, bias)
        self.quant_state = qs
        self.register_buffer("packed", tensors["weight"].to(device))
        # the state's tensors, so that weight_bytes() and .to() see them
        self.register_buffer("absmax", qs.absmax)
        self.register_buffer("code", qs.code)
        self.quant_type = qs.quant_type

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.quant_state.dtype:  # e.g. float32 runs: the exact dequantized weight
            return F.linear(x, self.dequantize(x.dtype))
        bnb = require_bnb()
        return bnb.matmul_4bit(x, self.packed.t(), quant_state=self.quant_state)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        bnb = require_bnb()
        return bnb.functional.dequantize_4bit(self.packed, self.quant_state).to(dtype)

    def weight_bytes(self) -> int:
        nested = self.quant_state.state2
        extra = 0 if nested is None else nested.absmax.numel() * nested.absmax.element_size()
        return super().weight_bytes() + extra

    def extra_repr(self) -> str:
        return super().extra_repr() + f", {self.quant_type}, blocksize={self.quant_state.blocksize}"
