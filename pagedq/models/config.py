"""The model's shape, read straight from a Hugging Face ``config.json``.

Both spellings of rope settings are read: ``rope_theta`` + ``rope_scaling`` (transformers 4)
and ``rope_parameters`` (transformers 5). What sets an architecture apart is declared by its
model class (:class:`ArchTraits`, read through :mod:`pagedq.models.registry`), not here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ArchTraits:
    """What an architecture of the Llama family changes in the shape it reads from config.json.

    ``qkv_bias``: Q/K/V projections have a bias; ``qk_norm``: per-head RMSNorm of q and k;
    ``window_switch``: the config key that must be true for ``sliding_window`` to apply (Qwen's
    ``use_sliding_window``); None when ``sliding_window`` alone decides.
    """

    qkv_bias: bool = False
    qk_norm: bool = False
    window_switch: str | None = None


@dataclass(frozen=True)
class LinearGroup:
    """Checkpoint linears of one decoder layer that read the same input, as the model holds them.

    ``parent``: the submodule holding them (``self_attn``); ``linears``: their checkpoint names,
    in the order their rows are packed into ``fused`` (None when the group is one unfused
    linear); ``feeds``: the module, relative to the layer, whose output is their input (a norm,
    or a linear), which activation-aware scaling (AWQ) folds its scales into — None if there is
    none to fold into. The loader fills fused parameters and places quantized layers by these
    groups, and every quantizer walks them.
    """

    parent: str
    linears: tuple[str, ...]
    fused: str | None = None
    feeds: str | None = None

    @property
    def module(self) -> str:
        """The name of the (fused) module in our model."""
        return self.fused or self.linears[0]


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
    def from_dict(cls, cfg: dict, architecture: str, traits: ArchTraits) -> ModelConfig:
        """The shape of ``cfg`` (a parsed config.json) for ``architecture``, whose model class
        declares ``traits`` (see :func:`pagedq.models.registry.read_config`)."""
        arch = architecture
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
        if traits.window_switch is not None and not cfg.get(traits.window_switch, False):
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
            qkv_bias=traits.qkv_bias or bool(cfg.get("attention_bias", False)),
            qk_norm=traits.qk_norm,
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
