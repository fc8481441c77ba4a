"""The model registry: Hugging Face architecture name -> our model class.

A model class declares what the rest of pagedq needs to know about its architecture (see
:class:`~pagedq.models.llama.LlamaForCausalLM`): ``hf_model_type``, ``traits`` (how it reads
config.json), ``linear_groups`` (which checkpoint linears fuse into which parameter, and which
are quantizable) and ``part_slices``. The loader, the quantizers and the test-model builder read
them from here, so adding a Llama-like architecture is one class and one line below.
"""

from __future__ import annotations

import json
import os

from .config import ModelConfig
from .granite import GraniteForCausalLM
from .llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

ARCHITECTURES: dict[str, type[LlamaForCausalLM]] = {}


def register_architecture(cls: type[LlamaForCausalLM]) -> type[LlamaForCausalLM]:
    """Serve checkpoints whose config.json names ``cls.__name__`` in ``architectures``."""
    ARCHITECTURES[cls.__name__] = cls
    return cls


for _cls in (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, GraniteForCausalLM):
    register_architecture(_cls)


def model_class(cfg: dict) -> type[LlamaForCausalLM]:
    """The class that serves a parsed config.json; ``ValueError`` naming what is supported."""
    archs = cfg.get("architectures") or []
    for a in archs:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    raise ValueError(
        f"unsupported architecture {archs or cfg.get('model_type')!r}; "
        f"pagedq supports {', '.join(ARCHITECTURES)}"
    )


def by_model_type(model_type: str) -> type[LlamaForCausalLM]:
    """The class of transformers' ``model_type`` (``llama``, ``qwen2``, ``granite``, ...)."""
    for cls in ARCHITECTURES.values():
        if cls.hf_model_type == model_type:
            return cls
    raise ValueError(
        f"unknown architecture {model_type!r}; choose one of "
        f"{sorted(c.hf_model_type for c in ARCHITECTURES.values())}"
    )


def config_from_dict(cfg: dict) -> ModelConfig:
    cls = model_class(cfg)
    return ModelConfig.from_dict(cfg, cls.__name__, cls.traits)


def read_config(model_dir: str) -> ModelConfig:
    """The :class:`ModelConfig` of a Hugging Face model folder."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"model folder {model_dir!r} has no config.json; pass a Hugging Face model folder")
    with open(path) as f:
        return config_from_dict(json.load(f))
