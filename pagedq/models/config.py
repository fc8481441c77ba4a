"""The model's shape, read straight from a Hugging Face ``config.json``.

Both spellings of rope settings are read: ``rope_theta`` + ``rope_scaling`` (transformers 4)
and ``rope_parameters`` (transformers 5).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

# architecture name -> what distinguishes it from plain Llama
SUPPORTED_ARCHITECTURES: dict[str, dict] = {
    "LlamaForCausalLM": {},
    "MistralForCausalLM": {},
    "Qwen2ForCausalLM": {"qkv_bias": True},
    "Qwen3ForCausalLM": {"qk_norm": True},
}

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_theta: float
    rope_scaling: dict = field(default_factory=dict)
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    # per layer: the sliding window of its attention (0: full attention)
    layer_windows: list[int] = field(default_factory=list)
    torch_dtype: torch.dtype | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dir(cls, model_dir: str) -> ModelConfig:
        path = os.path.join(model_dir, "config.json")
        if not os.path.isfile(path):
            raise ValueError(
                f"model folder {model_dir!r} has no config.json; pass a Hugging Face model folder"
            )
        with open(path) as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def from_dict(cls, cfg: dict) -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"unsupported architecture {archs or cfg.get('model_type')!r}; "
                f"pagedq supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        traits = SUPPORTED_ARCHITECTURES[arch]
        num_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        rope = dict(cfg.get("rope_parameters") or {})
        if cfg.get("rope_scaling"):
            rope.update(cfg["rope_scaling"])
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported rope scaling {rope_type!r} in config.json; pagedq supports {SUPPORTED_ROPE_TYPES}"
            )
        rope["rope_type"] = rope_type
        rope_theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        window = cfg.get("sliding_window")
        if arch.startswith("Qwen") and not cfg.get("use_sliding_window", False):
            window = None
        dtype_name = cfg.get("dtype") or cfg.get("torch_dtype")
        return cls(
            architecture=arch,
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or hidden // num_heads,
            vocab_size=cfg["vocab_size"],
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_theta=rope_theta,
            rope_scaling=rope,
            qkv_bias=bool(traits.get("qkv_bias") or cfg.get("attention_bias", False)),
            qk_norm=bool(traits.get("qk_norm", False)),
            sliding_window=window,
            layer_windows=_layer_windows(cfg, window, int(cfg["num_hidden_layers"])),
            torch_dtype=_DTYPE_NAMES.get(dtype_name) if isinstance(dtype_name, str) else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            raw=cfg,
        )

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes of K and V that one token occupies across all layers."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


def _layer_windows(cfg: dict, window: int | None, num_layers: int) -> list[int]:
    """Which layers attend through a sliding window: ``layer_types`` when the config lists them
    (Qwen2/Qwen3 with ``max_window_layers``, newer Mistral configs), else all or none."""
    if not window:
        return [0] * num_layers
    types = cfg.get("layer_types")
    if types:
        return [window if t == "sliding_attention" else 0 for t in types]
    return [window] * num_layers
