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

from pagedq.quant.formats import FORMATS, QuantConfig, WeightFormat, read_quant_config
from pagedq.quant.linear import QuantLinear, make_fused_quant_linear, make_quant_linear
from pagedq.quant.rtn import ON_LOAD, check_on_load, rtn

from .config import ModelConfig
from .llama import LlamaForCausalLM
from .registry import ARCHITECTURES

logger = logging.getLogger(__name__)


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
            for name in f.keys():  # noqa: SIM118 - safe_open is not iterable
                yield name, f.get_tensor(name)


def _fused_targets(model: LlamaForCausalLM) -> dict[str, tuple[str, slice]]:
    """checkpoint linear name -> (our fused module, the rows of it the linear fills)."""
    out = {}
    for group in model.linear_groups:
        if group.fused is not None:
            for name, rows in zip(group.linears, model.part_slices(group)):
                out[name] = (group.fused, rows)
    return out


def load_model(
    model_dir: str,
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    quantization: str | None = None,
):
    """Build the model on ``device`` in ``dtype`` and fill it from the checkpoint.

    A checkpoint with a ``quantization_config`` (GPTQ, AWQ, bitsandbytes) loads its projections
    as quantized layers; ``quantization="int8"`` or ``"int4"`` quantizes a dense checkpoint's
    projections as it loads (embeddings, norms and the LM head stay in ``dtype``).
    """
    qcfg = _checkpoint_quantization(model_dir, cfg, quantization)
    model = _build(ARCHITECTURES[cfg.architecture], cfg, dtype, device, max_positions)
    fmt = FORMATS[qcfg.method] if qcfg is not None else None
    loaded, quantized = _fill(model, model_dir, fmt)
    dense_params = [name for name, _ in model.named_parameters()]  # before quantized layers replace some
    replaced: set[str] = set()
    if qcfg is not None and fmt is not None:
        replaced = _install_quantized(model, quantized, qcfg, fmt, dtype, device)
    missing = sorted(_expected(model, dense_params, replaced) - loaded)
    if missing:
        raise ValueError(
            f"checkpoint in {model_dir!r} lacks weights: {missing[:6]}{' ...' if len(missing) > 6 else ''}"
        )
    if quantization is not None:
        _quantize_on_load(model, quantization, dtype, device)
    model.eval()
    return model


def _checkpoint_quantization(
    model_dir: str, cfg: ModelConfig, quantization: str | None
) -> QuantConfig | None:
    """The checkpoint's own quantization (None if dense), refusing a second one on top."""
    if quantization is not None:
        check_on_load(quantization)
    qcfg = read_quant_config(model_dir, cfg.raw)
    if qcfg is None:
        return None
    if quantization is not None:
        raise ValueError(
            f"this checkpoint is already quantized ({qcfg.method}); drop quantization={quantization!r}"
        )
    return qcfg


def _build(cls, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_positions: int):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are born in the model dtype: no float32 copy
    try:
        with torch.device(device):
            return cls(cfg, dtype, max_positions)
    finally:
        torch.set_default_dtype(previous)


def _fill(model, model_dir: str, fmt: WeightFormat | None) -> tuple[set[str], dict]:
    """Copy the checkpoint's dense tensors into ``model`` (fused parts into their rows); return
    what was filled and the tensors of quantized projections (module -> leaf -> tensor) of a
    checkpoint in format ``fmt`` (None: dense)."""
    params = dict(model.named_parameters())
    fused = _fused_targets(model)
    linears = tuple(fused) + tuple(g.linears[0] for g in model.linear_groups if g.fused is None)
    loaded: set[str] = set()
    quantized: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in iter_tensors(model_dir):
        if "rotary_emb.inv_freq" in name:
            continue
        key = name[len("model.") :] if name.startswith("model.") else name
        if key == "lm_head.weight" and model.lm_head is None:
            continue  # tied embeddings: the head is the embedding matrix
        if fmt is not None:
            module, leaf = _split_projection(key, linears)
            if module is not None and fmt.owns(leaf):
                quantized.setdefault(module, {})[leaf] = tensor
                continue
        target, rows = key, None
        for frag, (module, part_rows) in fused.items():
            if f".{frag}." in key:
                target, rows = key.replace(frag, module), part_rows
                break
        param = params.get(target)
        if param is None:
            raise ValueError(
                f"checkpoint tensor {name!r} has no place in {model.config.architecture}; is config.json right?"
            )
        dst = param.data if rows is None else param.data[rows]
        if dst.shape != tensor.shape:
            raise ValueError(
                f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}"
            )
        dst.copy_(tensor)
        loaded.add(f"{target}[{rows.start}]" if rows is not None else target)
    return loaded, quantized


def _expected(model, param_names: list[str], replaced: set[str]) -> set[str]:
    """What :func:`_fill` must have filled: every parameter (each part of a fused one) that a
    quantized layer did not replace."""
    fused_rows: dict[str, list[int]] = {}
    for module, rows in _fused_targets(model).values():
        fused_rows.setdefault(module, []).append(rows.start)
    expected: set[str] = set()
    for pname in param_names:
        module = pname.rpartition(".")[0]
        if module in replaced:
            continue
        starts = fused_rows.get(module.rpartition(".")[2])
        if starts is not None:
            expected.update(f"{pname}[{start}]" for start in starts)
        else:
            expected.add(pname)
    return expected


def _split_projection(key: str, linears: tuple[str, ...]) -> tuple[str | None, str]:
    """``layers.0.self_attn.q_proj.weight.absmax`` -> (``layers.0.self_attn.q_proj``, ``weight.absmax``)."""
    for proj in linears:
        i = key.find(f".{proj}.")
        if i != -1:
            end = i + len(proj) + 1
            return key[:end], key[end + 1 :]
    return None, ""


def _install_quantized(model, tensors: dict, qcfg: QuantConfig, fmt: WeightFormat, dtype, device) -> set[str]:
    """Replace the fused projections whose parts the checkpoint holds quantized; return their names."""
    replaced = set()
    for layer_idx, layer in enumerate(model.layers):
        for group in model.linear_groups:
            parent_name, fused_name, parts = group.parent, group.module, group.linears
            keys = [f"layers.{layer_idx}.{parent_name}.{p}" for p in parts]
            have = [k for k in keys if fmt.is_quantized(tensors.get(k, {}))]
            if not have:
                continue
            if len(have) != len(keys):
                raise ValueError(f"checkpoint quantizes only some of {keys}; pagedq needs all or none")
            weights = [fmt.unpack(tensors[k], qcfg, dtype, device) for k in keys]
            biases = [tensors[k].get("bias") for k in keys]
            bias = None if all(b is None for b in biases) else torch.cat([b.to(dtype) for b in biases])
            parent = getattr(layer, parent_name)
            dense = getattr(parent, fused_name)
            shapes = [
                (w.out_features, w.in_features) if isinstance(w, QuantLinear) else w.shape for w in weights
            ]
            if tuple(dense.weight.shape) != (sum(s[0] for s in shapes), shapes[0][1]):
                raise ValueError(
                    f"quantized {keys} unpack to {shapes}, which does not fit "
                    f"{fused_name} {tuple(dense.weight.shape)}; is config.json right?"
                )
            new_layer = make_fused_quant_linear(weights, bias, dtype, device, fmt.kernel_layout)
            setattr(parent, fused_name, new_layer)
            replaced.add(f"layers.{layer_idx}.{parent_name}.{fused_name}")
    leftover = sorted(k for k, v in tensors.items() if fmt.is_quantized(v) and not k.startswith("layers."))
    if leftover:
        raise ValueError(f"checkpoint has quantized tensors pagedq cannot place: {leftover[:4]}")
    for module, leaves in tensors.items():  # dense projections with a bias (nothing quantized)
        if not fmt.is_quantized(leaves) and "bias" in leaves:
            raise ValueError(f"checkpoint has a bias for {module} but no weights for it")
    return replaced


def _quantize_on_load(model, method: str, dtype, device) -> None:
    for layer in model.layers:
        for group in model.linear_groups:
            parent, name = getattr(layer, group.parent), group.module
            dense = getattr(parent, name)
            bias = None if dense.bias is None else dense.bias.data
            opts = ON_LOAD[method]
            group = opts["group_size"]
            if dense.in_features % max(group, 1):
                group = -1  # narrower than one group: one scale per output channel
            w = rtn(dense.weight.data, opts["bits"], group, opts["sym"])
            setattr(parent, name, make_quant_linear(w, bias, dtype, device))
