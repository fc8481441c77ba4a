"""Weight formats as the ecosystem writes them: the registry :data:`FORMATS`, one module each.

Every format unpacks to the canonical :class:`QuantWeight` (see :mod:`.base`) and, where
pagedq writes it, packs from it. A new format is one module with a :class:`WeightFormat`
subclass, registered below: the model loader, the quantizers and the kernels' layouts read it
from here.
"""

from __future__ import annotations

import json
import os

from .awq import AWQ, AWQ_ORDER, awq_pack, awq_unpack
from .base import QuantConfig, QuantWeight, WeightFormat, pack_int32, unpack_int32
from .bitsandbytes import BITSANDBYTES
from .gptq import GPTQ, gptq_pack, gptq_unpack

FORMATS: dict[str, WeightFormat] = {}


def register_format(fmt: WeightFormat) -> WeightFormat:
    """Load checkpoints whose ``quantization_config.quant_method`` is ``fmt.name``."""
    FORMATS[fmt.name] = fmt
    return fmt


for _fmt in (GPTQ, AWQ, BITSANDBYTES):
    register_format(_fmt)


def parse_quant_config(raw: dict) -> QuantConfig:
    method = str(raw.get("quant_method", "gptq")).lower()
    if method not in FORMATS:
        raise ValueError(
            f"quant_method {method!r} is not supported; pagedq reads {', '.join(FORMATS)} checkpoints"
        )
    return FORMATS[method].parse(raw)


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


__all__ = [
    "AWQ_ORDER",
    "FORMATS",
    "QuantConfig",
    "QuantWeight",
    "WeightFormat",
    "awq_pack",
    "awq_unpack",
    "gptq_pack",
    "gptq_unpack",
    "pack_int32",
    "parse_quant_config",
    "read_quant_config",
    "register_format",
    "unpack_int32",
]
