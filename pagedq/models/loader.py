"""Load a Hugging Face checkpoint folder (config.json + safetensors, sharded or not) into our model.

Q/K/V and gate/up weights are written into the slices of the fused projections as they are
read, so no unfused copy of the model is ever held in memory.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open

from .config import SUPPORTED_ARCHITECTURES, ModelConfig
from .llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

MODEL_CLASSES = {arch: LlamaForCausalLM for arch in SUPPORTED_ARCHITECTURES}


def safetensors_files(model_dir: str) -> list[str]:
    """The checkpoint's files: those the index names, else every ``*.safetensors`` file."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        missing = [n for n in names if not os.path.isfile(os.path.join(model_dir, n))]
        if missing:
            raise ValueError(f"model folder {model_dir!r} is missing shards named in its index: {missing}")
        return [os.path.join(model_dir, n) for n in names]
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(
            f"model folder {model_dir!r} has no *.safetensors weights; pagedq reads safetensors checkpoints "
            "(re-save with save_pretrained(..., safe_serialization=True))"
        )
    return [os.path.join(model_dir, f) for f in files]


def iter_tensors(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    for path in safetensors_files(model_dir):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


# checkpoint name fragment -> (our fused parameter, which slice of it)
_FUSED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def _fused_slice(model: LlamaForCausalLM, fused: str, part) -> slice:
    cfg = model.config
    if fused == "qkv_proj":
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        return {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}[part]
    i = cfg.intermediate_size
    return slice(part * i, (part + 1) * i)


def load_model(
    model_dir: str, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_positions: int
):
    """Build the model on ``device`` in ``dtype`` and fill it from the checkpoint."""
    cls = MODEL_CLASSES[cfg.architecture]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are born in the model dtype: no float32 copy
    try:
        with torch.device(device):
            model = cls(cfg, dtype, max_positions)
    finally:
        torch.set_default_dtype(previous)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for name, tensor in iter_tensors(model_dir):
        if "rotary_emb.inv_freq" in name:
            continue
        key = name[len("model.") :] if name.startswith("model.") else name
        if key == "lm_head.weight" and model.lm_head is None:
            continue  # tied embeddings: the head is the embedding matrix
        target, rows = key, None
        for frag, (fused, part) in _FUSED.items():
            if f".{frag}." in key:
                target = key.replace(frag, fused)
                rows = _fused_slice(model, fused, part)
                break
        param = params.get(target)
        if param is None:
            raise ValueError(
                f"checkpoint tensor {name!r} has no place in {cfg.architecture}; is config.json right?"
            )
        dst = param.data if rows is None else param.data[rows]
        if dst.shape != tensor.shape:
            raise ValueError(
                f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}"
            )
        dst.copy_(tensor)
        loaded.add(f"{target}[{rows.start}]" if rows is not None else target)
    expected = set()
    for pname in params:
        if pname.endswith(("qkv_proj.weight", "qkv_proj.bias")):
            expected.update(f"{pname}[{_fused_slice(model, 'qkv_proj', s).start}]" for s in "qkv")
        elif pname.endswith("gate_up_proj.weight"):
            expected.update(f"{pname}[{_fused_slice(model, 'gate_up_proj', s).start}]" for s in (0, 1))
        else:
            expected.add(pname)
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(
            f"checkpoint in {model_dir!r} lacks weights: {missing[:6]}{' ...' if len(missing) > 6 else ''}"
        )
    model.eval()
    return model
