"""Engine configuration: one dataclass, validated once, with errors that say how to fix them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .checks import Range
from .policies import check_policy, policy_help

if TYPE_CHECKING:  # torch is imported when an engine resolves its dtype and device, not before:
    import torch  # the HTTP server reads this module for its options and never imports torch

# dtype names -> torch attribute names
_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
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
    import torch

    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype == "auto":
        resolved = checkpoint_dtype or torch.float32
        if resolved == torch.float16 and device.type == "cpu":
            resolved = torch.bfloat16
    elif dtype in _DTYPES:
        resolved = getattr(torch, _DTYPES[dtype])
    else:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")
    if resolved not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {resolved}")
    return resolved


def resolve_device(device: str | torch.device) -> torch.device:
    import torch

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

    model: str = field(metadata={"help": "model folder, or pagedq-tiny (the bundled model)"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer folder (default: the model's)"})
    dtype: str | torch.dtype = field(default="auto", metadata={"help": "auto | float32 | bfloat16 | float16"})
    device: str | torch.device = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    block_size: int = field(default=16, metadata={"help": "tokens per KV block"})
    num_kv_blocks: int | None = field(default=None, metadata={"help": "KV pool size in blocks"})
    kv_cache_memory: int | float | str | None = field(
        default=None, metadata={"help": "KV pool size, bytes or e.g. 2GiB", "type": str}
    )
    max_num_seqs: int = field(default=256, metadata={"help": "sequences in one batch at most"})
    max_num_batched_tokens: int | None = field(
        default=None,
        metadata={"help": "tokens in one step at most (default: max(2048, max_num_seqs))"},
    )
    max_model_len: int | None = field(
        default=None, metadata={"help": "prompt + output tokens at most (default: the model's)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the engine's sampler"})
    enable_prefix_caching: bool = field(default=True, metadata={"help": "reuse cached prompt blocks"})
    enable_kv_sharing: bool = field(
        default=True, metadata={"help": "forked sequences share blocks (copy on write)"}
    )
    quantization: str | None = field(default=None, metadata={"help": "quantize on load: int8 | int4"})
    kv_cache_dtype: str = field(default="auto", metadata={"help": "auto | int8 | fp8_e4m3"})
    scheduling_policy: str = field(default="fcfs", metadata={"help": policy_help()})
    user_weights: dict[str, float] | None = field(
        default=None, metadata={"help": "fair share weight per user (default 1 each)"}
    )
    user_idle_seconds: float = field(
        default=600.0, metadata={"help": "users idle this long leave the per-user tables"}
    )

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
        if self.kv_cache_dtype == "fp8":
            self.kv_cache_dtype = "fp8_e4m3"
        if self.kv_cache_dtype not in ("auto", "int8", "fp8_e4m3"):
            raise ValueError(
                f"kv_cache_dtype must be 'auto' (the model dtype), 'int8' or 'fp8_e4m3', got {self.kv_cache_dtype!r}"
            )
        check_policy(self.scheduling_policy, self.user_weights)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        Range(float, gt=0).check("user_idle_seconds", self.user_idle_seconds)


def _positive_int(name: str, value, hint: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}" + (f" ({hint})" if hint else ""))
