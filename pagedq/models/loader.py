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


_QUANT_LEAVES = ("qweight", "qzeros", "scales", "g_idx")
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def load_model(
    model_dir: str,
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    quantization: str | None = None,
):
    """Build the model on ``device`` in ``dtype`` and fill it from the checkpoint.

    A checkpoint with a ``quantization_config`` (GPTQ, AWQ) loads its projections as
    quantized layers; ``quantization="int8"`` or ``"int4"`` quantizes a dense checkpoint's
    projections as it loads (embeddings, norms and the LM head stay in ``dtype``).
    """
    qcfg = None
    if cfg.raw.get("quantization_config") is not None or os.path.isfile(
        os.path.join(model_dir, "quantize_config.json")
    ):
        from pagedq.quant.formats import read_quant_config

        qcfg = read_quant_config(model_dir, cfg.raw)
        if quantization is not None:
            raise ValueError(
                f"this checkpoint is already quantized ({qcfg.method}); drop quantization={quantization!r}"
            )
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
    # tensors of quantized projections: module key -> leaf name -> tensor
    quantized: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in iter_tensors(model_dir):
        if "rotary_emb.inv_freq" in name:
            continue
        key = name[len("model.") :] if name.startswith("model.") else name
        if key == "lm_head.weight" and model.lm_head is None:
            continue  # tied embeddings: the head is the embedding matrix
        if qcfg is not None:
            module, leaf = _split_projection(key)
            if module is not None and (
                qcfg.method == "bitsandbytes" or leaf in _QUANT_LEAVES or leaf == "bias"
            ):
                quantized.setdefault(module, {})[leaf] = tensor
                continue
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
    replaced: set[str] = set()
    if qcfg is not None:
        replaced = _install_quantized(model, quantized, qcfg, dtype, device, loaded)
    expected = set()
    for pname in params:
        if pname.rpartition(".")[0] in replaced:
            continue
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
    if quantization is not None:
        _quantize_on_load(model, quantization, dtype, device)
    model.eval()
    return model


def _split_projection(key: str) -> tuple[str | None, str]:
    """``layers.0.self_attn.q_proj.weight.absmax`` -> (``layers.0.self_attn.q_proj``, ``weight.absmax``)."""
    for proj in _PROJECTIONS:
        i = key.find(f".{proj}.")
        if i != -1:
            end = i + len(proj) + 1
            return key[:end], key[end + 1 :]
    return None, ""


def _bnb_layer(tensors: dict[str, torch.Tensor], qcfg, dtype, device):
    """One bitsandbytes projection: 8-bit as a canonical weight, 4-bit as a bitsandbytes layer."""
    from pagedq.quant import bnb

    if "SCB" in tensors:
        return bnb.int8_weight(tensors)
    if any(k.startswith("weight.quant_state.") for k in tensors):
        return bnb.Bnb4bitLinear(tensors, None, dtype, device)
    raise ValueError(
        f"bitsandbytes tensors {sorted(tensors)} are neither LLM.int8 (SCB) nor 4-bit (quant_state)"
    )


def _install_quantized(model, tensors: dict, qcfg, dtype, device, loaded: set[str]) -> set[str]:
    """Replace the fused projections whose parts the checkpoint holds quantized; return their names."""
    from pagedq.quant.formats import UNPACKERS
    from pagedq.quant.linear import make_fused_quant_linear

    replaced = set()
    for layer_idx, layer in enumerate(model.layers):
        for parent_name, fused_name, parts in (
            ("self_attn", "qkv_proj", _FUSED_PARTS["qkv_proj"]),
            ("self_attn", "o_proj", ("o_proj",)),
            ("mlp", "gate_up_proj", _FUSED_PARTS["gate_up_proj"]),
            ("mlp", "down_proj", ("down_proj",)),
        ):
            keys = [f"layers.{layer_idx}.{parent_name}.{p}" for p in parts]
            have = [k for k in keys if _is_quantized(tensors.get(k, {}), qcfg)]
            if not have:
                continue
            if len(have) != len(keys):
                raise ValueError(f"checkpoint quantizes only some of {keys}; pagedq needs all or none")
            if qcfg.method == "bitsandbytes":
                weights = [_bnb_layer(tensors[k], qcfg, dtype, device) for k in keys]
            else:
                weights = [UNPACKERS[qcfg.method](tensors[k], qcfg) for k in keys]
            biases = [tensors[k].get("bias") for k in keys]
            bias = None if all(b is None for b in biases) else torch.cat([b.to(dtype) for b in biases])
            parent = getattr(layer, parent_name)
            dense = getattr(parent, fused_name)
            shapes = [
                (w.out_features, w.in_features) if isinstance(w, torch.nn.Module) else w.shape
                for w in weights
            ]
            if tuple(dense.weight.shape) != (sum(s[0] for s in shapes), shapes[0][1]):
                raise ValueError(
                    f"quantized {keys} unpack to {shapes}, which does not fit "
                    f"{fused_name} {tuple(dense.weight.shape)}; is config.json right?"
                )
            layout = "awq" if qcfg.method == "awq" else "gptq"
            setattr(parent, fused_name, make_fused_quant_linear(weights, bias, dtype, device, layout))
            replaced.add(f"layers.{layer_idx}.{parent_name}.{fused_name}")
    leftover = sorted(k for k, v in tensors.items() if _is_quantized(v, qcfg) and not k.startswith("layers."))
    if leftover:
        raise ValueError(f"checkpoint has quantized tensors pagedq cannot place: {leftover[:4]}")
    for module, leaves in tensors.items():  # dense projections with a bias (nothing quantized)
        if not _is_quantized(leaves, qcfg) and "bias" in leaves:
            raise ValueError(f"checkpoint has a bias for {module} but no weights for it")
    return replaced


def _is_quantized(leaves: dict, qcfg) -> bool:
    if qcfg.method == "bitsandbytes":
        return "weight" in leaves
    return "qweight" in leaves


def _quantize_on_load(model, method: str, dtype, device) -> None:
    from pagedq.quant.linear import make_quant_linear
    from pagedq.quant.rtn import ON_LOAD, rtn

    if method not in ON_LOAD:
        raise ValueError(f"quantization must be one of {sorted(ON_LOAD)} or None, got {method!r}")
    for layer in model.layers:
        for parent, name in (
            (layer.self_attn, "qkv_proj"),
            (layer.self_attn, "o_proj"),
            (layer.mlp, "gate_up_proj"),
            (layer.mlp, "down_proj"),
        ):
            dense = getattr(parent, name)
            bias = None if dense.bias is None else dense.bias.data
            opts = dict(ON_LOAD[method])
            if dense.in_features % max(opts["group_size"], 1):
                opts["group_size"] = -1  # narrower than one group: one scale per output channel
            setattr(parent, name, make_quant_linear(rtn(dense.weight.data, **opts), bias, dtype, device))
