"""Engine configuration: one dataclass, validated once, with errors that say how to fix them."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .checks import Range

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_memory(value: int | float | str) -> int:
    """Turn ``"2GiB"``, ``"512 MB"``, ``1e9`` or ``1073741824`` into a byte count."""
    if isinstance(value, bool):
        raise ValueError(f"kv_cache_memory must be a byte count or a string like '2GiB', got {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 bytes, got {value}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(
            f"kv_cache_memory must be a byte count or a string like '2GiB' or '512MB', got {value!r}"
        )
    nbytes = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if nbytes <= 0:
        raise ValueError(f"kv_cache_memory must be > 0 bytes, got {value!r}")
    return nbytes


def resolve_dtype(
    dtype: str | torch.dtype, checkpoint_dtype: torch.dtype | None, device: torch.device
) -> torch.dtype:
    """Pick the activation/weight dtype. ``"auto"`` follows the checkpoint, except that
    float16 on a CPU becomes bfloat16 (CPUs have fast bf16 kernels, not fp16 ones)."""
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype == "auto":
        resolved = checkpoint_dtype or torch.float32
        if resolved == torch.float16 and device.type == "cpu":
            resolved = torch.bfloat16
    elif dtype in _DTYPES:
        resolved = _DTYPES[dtype]
    else:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")
    if resolved not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {resolved}")
    return resolved


def resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if hasattr(torch, "xpu") and torch.xpu.is_available():
            return torch.device("xpu")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for, but torch sees no CUDA device; use device='cpu'")
    return dev


@dataclass
class EngineConfig:
    """Everything that shapes an engine. Field names follow vLLM's engine arguments.

    The KV pool is sized by ``num_kv_blocks`` or by ``kv_cache_memory`` (bytes or "2GiB");
    with neither, it gets what ``max_num_seqs`` sequences of ``max_model_len`` tokens need,
    capped by a share of the device memory. ``enable_kv_sharing=False`` makes forked sequences
    (``n > 1`` samples, beams) copy their parent's blocks instead of sharing them — the
    baseline that ``pagedq bench sharing`` measures against. ``scheduling_policy="fair"``
    shares the engine fairly between the users named in ``add_request(..., user=)``, in
    proportion to ``user_weights`` (default 1 each); users idle for ``user_idle_seconds`` leave
    the per-user tables.
    """

    model: str
    tokenizer: str | None = None
    dtype: str | torch.dtype = "auto"
    device: str | torch.device = "auto"
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory: int | float | str | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    seed: int = 0
    enable_prefix_caching: bool = True
    enable_kv_sharing: bool = True
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    scheduling_policy: str = "fcfs"
    user_weights: dict[str, float] | None = None
    user_idle_seconds: float = 600.0

    def validate(self) -> None:
        _positive_int("block_size", self.block_size)
        _positive_int("max_num_seqs", self.max_num_seqs)
        if self.num_kv_blocks is not None:
            _positive_int("num_kv_blocks", self.num_kv_blocks, hint="or pass kv_cache_memory instead")
            if self.kv_cache_memory is not None:
                raise ValueError("pass either num_kv_blocks or kv_cache_memory, not both")
        if self.kv_cache_memory is not None:
            self.kv_cache_memory = parse_memory(self.kv_cache_memory)
        if self.max_num_batched_tokens is not None:
            _positive_int("max_num_batched_tokens", self.max_num_batched_tokens)
        if self.max_model_len is not None:
            _positive_int("max_model_len", self.max_model_len)
        if self.quantization is not None and self.quantization not in ("int8", "int4"):
            raise ValueError(
                f"quantization must be 'int8', 'int4' or None (GPTQ/AWQ checkpoints are detected from "
                f"config.json), got {self.quantization!r}"
            )
        if self.kv_cache_dtype == "fp8":
            self.kv_cache_dtype = "fp8_e4m3"
        if self.kv_cache_dtype not in ("auto", "int8", "fp8_e4m3"):
            raise ValueError(
                f"kv_cache_dtype must be 'auto' (the model dtype), 'int8' or 'fp8_e4m3', got {self.kv_cache_dtype!r}"
            )
        if self.scheduling_policy not in ("fcfs", "fair"):
            raise ValueError(
                f"scheduling_policy must be 'fcfs' (first come first served) or 'fair' (per-user fair "
                f"share), got {self.scheduling_policy!r}"
            )
        if self.user_weights is not None and self.scheduling_policy != "fair":
            raise ValueError("user_weights only apply with scheduling_policy='fair'")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        Range(float, gt=0).check("user_idle_seconds", self.user_idle_seconds)


def _positive_int(name: str, value, hint: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}" + (f" ({hint})" if hint else ""))
