"""bitsandbytes checkpoints, as transformers serializes them: LLM.int8 (``weight`` + ``SCB``)
and 4-bit NF4 / FP4 (``weight`` + ``weight.quant_state...``). Read only; the layers are in
:mod:`pagedq.quant.bnb` (4-bit runs through the ``bitsandbytes`` package, imported there)."""

from __future__ import annotations

import torch

from .base import QuantConfig, WeightFormat


class BitsAndBytesFormat(WeightFormat):
    name = "bitsandbytes"
    marker = "weight"

    def parse(self, raw: dict) -> QuantConfig:
        return QuantConfig("bitsandbytes", 4 if raw.get("load_in_4bit") else 8, -1, True, False, "bnb", raw)

    def owns(self, leaf: str) -> bool:
        return True  # weight, SCB, weight.absmax, weight.quant_state..., bias

    def unpack(self, tensors: dict[str, torch.Tensor], cfg: QuantConfig, dtype: torch.dtype, device):
        """8-bit as a canonical weight, 4-bit as a bitsandbytes layer."""
        from pagedq.quant import bnb

        if "SCB" in tensors:
            return bnb.int8_weight(tensors)
        if any(k.startswith("weight.quant_state.") for k in tensors):
            return bnb.Bnb4bitLinear(tensors, None, dtype, device)
        raise ValueError(
            f"bitsandbytes tensors {sorted(tensors)} are neither LLM.int8 (SCB) nor 4-bit (quant_state)"
        )


BITSANDBYTES = BitsAndBytesFormat()
