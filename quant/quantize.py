"""``pagedq.quant.quantize``: write a GPTQ- or AWQ-layout checkpoint from a dense one.

The dense model runs in transformers (float32) on calibration text; decoder layers are
quantized in order, and each layer is calibrated on the outputs of the layers already
quantized before it (the sequential recipe of GPTQ and AWQ). The result is a normal Hugging
Face folder — ``config.json`` with a ``quantization_config``, tokenizer files, one
``model.safetensors`` — that pagedq (and other GPTQ/AWQ readers) load.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field

import torch

from pagedq.models.registry import model_class

from .formats import FORMATS, QuantWeight, WeightFormat
from .gptq import gptq_quantize, hessian
from .rtn import rtn

# quantizer -> the format of the checkpoint it writes
METHODS = {"gptq": "gptq", "awq": "awq", "rtn": "gptq"}


@dataclass
class QuantizeResult:
    out_dir: str
    weights: dict[str, QuantWeight] = field(
        default_factory=dict
    )  # "model.layers.0.self_attn.q_proj" -> weight


class _Stop(Exception):
    pass


def default_calibration(tokenizer, num_samples: int = 32, seq_len: int = 256) -> torch.Tensor:
    """Windows of Python's standard-library sources (the text our benchmarks use), nothing downloaded."""
    import sysconfig

    texts = []
    stdlib = sysconfig.get_paths()["stdlib"]
    for name in (
        "argparse.py",
        "json/decoder.py",
        "collections/__init__.py",
        "typing.py",
        "pathlib.py",
        "inspect.py",
    ):
        path = os.path.join(stdlib, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
    return calibration_ids(tokenizer, texts, num_samples, seq_len)


def calibration_ids(tokenizer, texts: list[str], num_samples: int, seq_len: int) -> torch.Tensor:
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer.encode(t, add_special_tokens=False))
    if len(ids) < seq_len:
        raise ValueError(
            f"calibration text has {len(ids)} tokens, fewer than seq_len={seq_len}; pass more text"
        )
    n = min(num_samples, len(ids) // seq_len)
    stride = (len(ids) - seq_len) // max(n - 1, 1)
    return torch.tensor([ids[i * stride : i * stride + seq_len] for i in range(n)])


def _capture(model, ids: torch.Tensor, modules: list) -> list[torch.Tensor]:
    """Inputs of ``modules`` (in forward order) for the calibration batch; stops after the last."""
    seen: list[torch.Tensor] = []

    def hook(mod, args):
        seen.append(args[0].detach().reshape(-1, args[0].shape[-1]))
        if len(seen) == len(modules):
            raise _Stop

    handles = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        with torch.no_grad():
            model(ids)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return seen


def quantize(
    model_dir: str,
    out_dir: str,
    method: str = "gptq",
    bits: int = 4,
    group_size: int = 128,
    sym: bool = False,
    act_order: bool = False,
    calibration: list[str] | None = None,
    num_samples: int = 32,
    seq_len: int = 256,
    damp: float = 0.01,
    progress: bool = True,
) -> QuantizeResult:
    """Quantize every projection of the decoder layers of ``model_dir`` and write ``out_dir``.

    ``method``: ``gptq`` (Hessian-based error feedback), ``awq`` (activation-aware scales,
    4-bit asymmetric, written in AWQ's GEMM layout) or ``rtn`` (round to nearest). GPTQ and
    RTN write GPTQ's layout (format ``gptq``). ``calibration`` texts default to Python's
    standard-library sources. Embeddings, norms and the LM head stay as they are.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
    if bits not in (4, 8) or (method == "awq" and bits != 4):
        raise ValueError(f"bits must be 4 or 8 (AWQ: 4), got {bits} for {method}")
    if method == "awq" and sym:
        raise ValueError("AWQ checkpoints are asymmetric (zero_point=True); drop sym=True")
    if os.path.abspath(out_dir) == os.path.abspath(model_dir):
        raise ValueError("out_dir must differ from model_dir")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    src_dtype = getattr(
        torch, str(config.get("torch_dtype") or config.get("dtype") or "float32").replace("torch.", "")
    )
    ids = (
        calibration_ids(tok, calibration, num_samples, seq_len)
        if calibration is not None
        else default_calibration(tok, num_samples, seq_len)
    )
    groups = model_class(config).linear_groups  # which linears to quantize, and what feeds them
    layers = model.model.layers
    result = QuantizeResult(out_dir)
    iterator = range(len(layers))
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=f"{method} {bits}-bit", unit="layer")
    for i in iterator:
        layer = layers[i]
        prefix = f"model.layers.{i}"
        if method == "awq":
            _awq_layer(model, ids, layer, prefix, bits, group_size, groups, result)
            continue
        for group in groups:
            parent_name, names = group.parent, group.linears
            parent = getattr(layer, parent_name)
            mods = [getattr(parent, n) for n in names]
            h = hessian(_capture(model, ids, [mods[0]])[0]) if method == "gptq" else None
            for name, mod in zip(names, mods):
                if h is not None:
                    qw = gptq_quantize(mod.weight.data, h, bits, group_size, sym, act_order, damp, min_zero=1)
                else:
                    qw = rtn(mod.weight.data, bits, group_size, sym, min_zero=1)
                qw.scales = qw.scales.half().float()  # what the checkpoint's fp16 scales read back as
                mod.weight.data.copy_(qw.dequantize())  # later layers calibrate on quantized outputs
                result.weights[f"{prefix}.{parent_name}.{name}"] = qw
    fmt = FORMATS[METHODS[method]]
    extra = {} if method == "awq" else {"damp_percent": damp, "quantizer": f"pagedq-{method}"}
    qconfig = fmt.quantization_config(bits, group_size, sym, act_order, **extra)
    _write(model_dir, out_dir, model, result, config, fmt, qconfig, src_dtype)
    return result


def _awq_layer(model, ids, layer, prefix, bits, group_size, groups, result) -> None:
    """AWQ on one decoder layer: per input channel scales searched on each group's calibration
    input, multiplied into the group's weights and divided out of the module that feeds it (a
    norm's weight, or the rows of the linear before); groups with nothing to fold into are
    quantized unscaled. Then every linear is rounded to nearest."""
    from .awq import search_scale

    parents = [getattr(layer, g.parent) for g in groups]
    firsts = [getattr(p, g.linears[0]) for p, g in zip(parents, groups)]
    xs = _capture(model, ids, firsts)  # each group's input, in forward order
    with torch.no_grad():
        for group, parent, x in zip(groups, parents, xs):
            if group.feeds is None:
                continue
            mods = [getattr(parent, n) for n in group.linears]
            s = search_scale(x, [m.weight.data for m in mods], bits, group_size)
            for m in mods:
                m.weight.data.mul_(s)
            prev = layer.get_submodule(group.feeds)
            if prev.weight.dim() == 1:  # a norm: its weight scales each channel
                prev.weight.data.div_(s)
            else:  # a linear: its output rows are the input channels of this group
                prev.weight.data.div_(s[:, None])
        for group, parent in zip(groups, parents):
            for name in group.linears:
                mod = getattr(parent, name)
                qw = rtn(mod.weight.data, bits, group_size, sym=False)
                qw.scales = qw.scales.half().float()
                mod.weight.data.copy_(qw.dequantize())
                result.weights[f"{prefix}.{group.parent}.{name}"] = qw


def _write(
    model_dir, out_dir, model, result: QuantizeResult, config: dict, fmt: WeightFormat, qconfig: dict, dtype
) -> None:
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(model_dir):
        src = os.path.join(model_dir, name)
        if (
            os.path.isfile(src)
            and not name.endswith(".safetensors")
            and name != "model.safetensors.index.json"
        ):
            shutil.copy(src, os.path.join(out_dir, name))
    tensors = {}
    tied = config.get("tie_word_embeddings", False)
    for name, t in model.state_dict().items():
        module = name.rpartition(".")[0]
        if module in result.weights:
            continue
        if tied and name == "lm_head.weight":
            continue
        tensors[name] = t.to(dtype).contiguous()
    qcfg = fmt.parse(qconfig)
    for module, qw in result.weights.items():
        packed = fmt.pack(qw, qcfg)
        for leaf, t in packed.items():
            tensors[f"{module}.{leaf}"] = t.contiguous()
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    config = dict(config, quantization_config=qconfig)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
