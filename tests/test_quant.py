"""Quantized weights: GPTQ / AWQ checkpoints and quantize-on-load, against dequantized references.

The checkpoints here are packed by the small writer below, written from the published layouts
(AutoGPTQ / AutoAWQ), not with pagedq's own packing code, so a loader bug cannot hide behind a
matching writer bug.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from pagedq.quant.formats import QuantConfig, QuantWeight, awq_unpack, gptq_unpack
from pagedq.quant.linear import (
    GroupedLinear,
    Int4Linear,
    Int8Linear,
    make_fused_quant_linear,
    make_quant_linear,
)
from safetensors.torch import load_file, save_file

from pagedq import LLM, SamplingParams

from .conftest import PROMPTS

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]

# --- an independent writer of the published layouts ----------------------------------------------


def _to_int32(words: list[int]) -> torch.Tensor:
    return torch.tensor([w - 2**32 if w >= 2**31 else w for w in words], dtype=torch.int64).to(torch.int32)


def ref_pack_gptq(q, zeros, scales, g_idx, bits, v1):
    """AutoGPTQ layout: qweight[K/pf, N] packed along K, qzeros[G, N/pf] along N, LSB first."""
    n, k = q.shape
    pf = 32 // bits
    qw = [[0] * n for _ in range(k // pf)]
    for kk in range(k):
        for nn in range(n):
            qw[kk // pf][nn] |= int(q[nn, kk]) << (bits * (kk % pf))
    g = zeros.shape[0]
    qz = [[0] * (n // pf) for _ in range(g)]
    for gg in range(g):
        for nn in range(n):
            z = int(zeros[gg, nn]) - (1 if v1 else 0)
            qz[gg][nn // pf] |= z << (bits * (nn % pf))
    return {
        "qweight": torch.stack([_to_int32(r) for r in qw]),
        "qzeros": torch.stack([_to_int32(r) for r in qz]),
        "scales": scales.to(torch.float16),
        "g_idx": g_idx.to(torch.int32),
    }


def ref_pack_awq(q, zeros, scales):
    """AutoAWQ GEMM layout: qweight[K, N/8] packed along N, nibble i holds column AWQ_ORDER[i]."""

    def pack_cols(m):  # m: [R, N] codes
        r, n = m.shape
        out = []
        for rr in range(r):
            row = []
            for c in range(n // 8):
                word = 0
                for i in range(8):
                    word |= int(m[rr, 8 * c + AWQ_ORDER[i]]) << (4 * i)
                row.append(word)
            out.append(_to_int32(row))
        return torch.stack(out)

    return {"qweight": pack_cols(q.T), "qzeros": pack_cols(zeros), "scales": scales.to(torch.float16)}


def ref_dequant(q, zeros, scales, g_idx):
    s = scales.to(torch.float16).float()  # the checkpoint stores fp16 scales
    return (q.float() - zeros[g_idx].T.float()) * s[g_idx].T


def random_weight(n, k, bits, group, sym, act_order, seed, v1=True):
    g = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    size = k if group == -1 else group
    groups = k // size
    q = torch.randint(0, maxq + 1, (n, k), generator=g, dtype=torch.int64)
    if sym:
        zeros = torch.full((groups, n), (maxq + 1) // 2, dtype=torch.int64)
    else:
        zeros = torch.randint(1 if v1 else 0, maxq + 1, (groups, n), generator=g, dtype=torch.int64)
    scales = torch.rand(groups, n, generator=g) * 0.02 + 0.001
    if act_order:
        perm = torch.randperm(k, generator=g)
        g_idx = torch.empty(k, dtype=torch.int64)
        g_idx[perm] = torch.arange(k) // size
    else:
        g_idx = torch.arange(k) // size
    return q, zeros, scales, g_idx


GPTQ_CASES = [
    # bits, group, sym, act_order, v1
    (4, 32, True, False, True),
    (4, 64, False, False, True),
    (4, 32, False, True, True),
    (4, 32, False, True, False),
    (4, -1, True, False, False),
    (8, 32, True, False, True),
    (8, 64, False, True, False),
    (8, -1, True, False, True),
]


@pytest.mark.parametrize(("bits", "group", "sym", "act_order", "v1"), GPTQ_CASES)
def test_gptq_layer_equals_dequantized_reference(bits, group, sym, act_order, v1):
    n, k = 128, 256
    q, zeros, scales, g_idx = random_weight(n, k, bits, group, sym, act_order, seed=bits * 100 + k, v1=v1)
    packed = ref_pack_gptq(q, zeros, scales, g_idx, bits, v1)
    cfg = QuantConfig("gptq", bits, group, sym, act_order, "gptq" if v1 else "gptq_v2")
    w = gptq_unpack(packed, cfg)
    ref_w = ref_dequant(q, zeros, scales, g_idx)
    torch.testing.assert_close(w.dequantize(), ref_w, rtol=0, atol=0)
    bias = torch.randn(n)
    layer = make_quant_linear(w, bias, torch.float32, torch.device("cpu"))
    if bits == 4:
        assert isinstance(layer, Int4Linear)
    elif group == -1 and sym:
        assert isinstance(layer, Int8Linear)
    else:
        assert isinstance(layer, GroupedLinear)
    for threshold in (10**9, 0):  # the weight-only kernel, then dequantize + GEMM
        layer.dequant_min_tokens = threshold
        for rows in (1, 5):
            x = torch.randn(rows, k)
            torch.testing.assert_close(layer(x), x @ ref_w.T + bias, rtol=1e-5, atol=1e-4)


def test_awq_layer_equals_dequantized_reference():
    n, k = 128, 256
    q, zeros, scales, g_idx = random_weight(n, k, 4, 64, False, False, seed=7, v1=False)
    w = awq_unpack(ref_pack_awq(q, zeros, scales), QuantConfig("awq", 4, 64, False))
    ref_w = ref_dequant(q, zeros, scales, g_idx)
    torch.testing.assert_close(w.dequantize(), ref_w, rtol=0, atol=0)
    layer = make_quant_linear(w, None, torch.float32, torch.device("cpu"))
    assert isinstance(layer, Int4Linear)
    for threshold in (10**9, 0):
        layer.dequant_min_tokens = threshold
        x = torch.randn(7, k)
        torch.testing.assert_close(layer(x), x @ ref_w.T, rtol=1e-5, atol=1e-4)


def test_bf16_kernels_stay_close_to_the_reference():
    n, k = 128, 256
    q, zeros, scales, g_idx = random_weight(n, k, 4, 32, False, True, seed=3)
    ref_w = ref_dequant(q, zeros, scales, g_idx)
    w = QuantWeight(q.to(torch.uint8), scales.to(torch.float16).float(), zeros.float(), g_idx, 4)
    layer = make_quant_linear(w, None, torch.bfloat16, torch.device("cpu"))
    x = torch.randn(4, k)
    ref = x @ ref_w.T
    for threshold in (10**9, 0):
        layer.dequant_min_tokens = threshold
        xb = torch.randn(6, k)
        out = layer(xb.bfloat16()).float()
        err = (out - xb @ ref_w.T).abs().max() / (xb @ ref_w.T).abs().max()
        assert err < 2e-2, err
    assert ref.shape == (4, n)


def test_unfusable_projections_run_side_by_side():
    """q/k/v with different act-order permutations cannot share one int4 layer: they run apart."""
    parts, refs = [], []
    for seed in (1, 2, 3):
        q, zeros, scales, g_idx = random_weight(64, 128, 4, 32, False, True, seed=seed)
        parts.append(QuantWeight(q.to(torch.uint8), scales, zeros.float(), g_idx, 4))
        refs.append(parts[-1].dequantize())
    layer = make_fused_quant_linear(parts, None, torch.float32, torch.device("cpu"))
    x = torch.randn(5, 128)
    torch.testing.assert_close(layer(x), x @ torch.cat(refs).T, rtol=1e-5, atol=1e-4)


# --- whole models ----------------------------------------------------------------------------------

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_quantized(
    src: str, out_q: str, out_dense: str, fmt: str, bits: int, group: int, sym: bool, act_order: bool
):
    """Quantize every projection of ``src`` (round to nearest), write it in ``fmt``'s layout to
    ``out_q`` and the dequantized weights as a dense checkpoint to ``out_dense``."""
    tensors = load_file(os.path.join(src, "model.safetensors"))
    qt, dt = {}, {}
    g = torch.Generator().manual_seed(0)
    perms = {}
    for name, t in tensors.items():
        module, _, leaf = name.rpartition(".")
        proj = module.rpartition(".")[2]
        if proj not in PROJ or leaf != "weight":
            qt[name] = dt[name] = t
            continue
        n, k = t.shape
        size = k if group == -1 else group
        maxq = 2**bits - 1
        w = t.float().reshape(n, k // size, size)
        lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        if sym:
            hi = torch.maximum(-lo, hi)
            lo = -hi
        scale = ((hi - lo) / maxq).to(torch.float16).float()
        zero = torch.full_like(scale, (maxq + 1) // 2) if sym else torch.round(-lo / scale).clamp(1, maxq)
        if act_order:  # one permutation per input: q/k/v share it, as do gate/up
            key = (
                module.rpartition(".")[0],
                k,
                proj in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"),
            )
            if key not in perms:
                perms[key] = torch.randperm(k, generator=g)
            g_idx = torch.empty(k, dtype=torch.int64)
            g_idx[perms[key]] = torch.arange(k) // size
        else:
            g_idx = torch.arange(k) // size
        s_k, z_k = scale.T[g_idx].T, zero.T[g_idx].T  # [N, K]
        q = torch.clamp(torch.round(t.float() / s_k) + z_k, 0, maxq).to(torch.int64)
        zeros_i, scales_g = zero.T.to(torch.int64), scale.T
        dt[name] = ref_dequant(q, zeros_i, scales_g, g_idx)
        if fmt == "awq":
            packed = ref_pack_awq(q, zeros_i, scales_g)
        else:
            packed = ref_pack_gptq(q, zeros_i, scales_g, g_idx, bits, v1=True)
        for leaf_name, v in packed.items():
            qt[f"{module}.{leaf_name}"] = v
    if fmt == "awq":
        qconfig = {
            "quant_method": "awq",
            "bits": 4,
            "group_size": group,
            "zero_point": True,
            "version": "gemm",
        }
    else:
        qconfig = {
            "quant_method": "gptq",
            "bits": bits,
            "group_size": group,
            "sym": sym,
            "desc_act": act_order,
            "checkpoint_format": "gptq",
        }
    save_twins(src, out_q, out_dense, qt, dt, qconfig)


def save_twins(src: str, out_q: str, out_dense: str, qt: dict, dt: dict, qconfig: dict) -> None:
    """Write the quantized tensors ``qt`` (with ``qconfig``) and the dense ``dt`` beside the
    other files of ``src``."""
    for out, ts in ((out_q, qt), (out_dense, dt)):
        shutil.copytree(src, out)
        os.remove(os.path.join(out, "model.safetensors"))
        save_file({k: v.contiguous() for k, v in ts.items()}, os.path.join(out, "model.safetensors"))
    with open(os.path.join(out_q, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = qconfig
    with open(os.path.join(out_q, "config.json"), "w") as f:
        json.dump(cfg, f)


MODEL_CASES = [
    ("llama", "gptq", 4, 32, False, True),
    ("qwen2", "gptq", 4, 32, True, False),
    ("llama", "gptq", 8, -1, True, False),
    ("llama", "gptq", 8, 32, False, True),
    ("llama", "awq", 4, 32, False, False),
    ("granite", "gptq", 4, 32, False, True),
    ("granite", "awq", 4, 32, False, False),
]


@pytest.mark.parametrize(("arch", "fmt", "bits", "group", "sym", "act_order"), MODEL_CASES)
def test_quantized_model_generates_like_its_dequantized_twin(
    model_factory, tmp_path, arch, fmt, bits, group, sym, act_order
):
    src = model_factory(arch)
    qdir, ddir = str(tmp_path / "q"), str(tmp_path / "d")
    write_quantized(src, qdir, ddir, fmt, bits, group, sym, act_order)
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    with LLM(ddir, dtype="float32") as llm:
        ref = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, sp, use_tqdm=False)]
        dense_bytes = llm.stats()["weight_bytes"]
    with LLM(qdir, dtype="float32") as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, sp, use_tqdm=False)]
        layer = llm.engine.runner.model.layers[0].self_attn.qkv_proj
        assert layer.__class__.__name__ in ("Int4Linear", "Int8Linear", "GroupedLinear")
        assert llm.stats()["weight_bytes"] < dense_bytes
    assert got == ref


@pytest.mark.parametrize(("arch", "method"), [("llama", "int8"), ("llama", "int4"), ("granite", "int4")])
def test_quantize_on_load_equals_its_dequantized_weights(model_factory, arch, method):
    tiny_llama = model_factory(arch)
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    with LLM(tiny_llama, dtype="float32", quantization=method) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, sp, use_tqdm=False)]
        model = llm.engine.runner.model
        deq = {}
        for i, layer in enumerate(model.layers):
            for mod, name in (
                (layer.self_attn, "qkv_proj"),
                (layer.self_attn, "o_proj"),
                (layer.mlp, "gate_up_proj"),
                (layer.mlp, "down_proj"),
            ):
                deq[(i, name)] = getattr(mod, name).dequantize(torch.float32).clone()
        qbytes = llm.stats()["weight_bytes"]
    with LLM(tiny_llama, dtype="float32") as llm:
        model = llm.engine.runner.model
        dense_bytes = llm.stats()["weight_bytes"]
        for (i, name), w in deq.items():
            layer = model.layers[i]
            mod = layer.self_attn if name in ("qkv_proj", "o_proj") else layer.mlp
            getattr(mod, name).set_weight(w)
        ref = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, sp, use_tqdm=False)]
    assert got == ref
    assert qbytes < dense_bytes


def test_quantization_errors_name_the_fix(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="quantization must be 'int8', 'int4' or None"):
        LLM(tiny_llama, quantization="int3")
    out = tmp_path / "awq-gemv"
    shutil.copytree(tiny_llama, out)
    with open(out / "config.json") as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"}
    with open(out / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="AWQ version 'gemv' is not supported; pagedq reads AWQ 'gemm'"):
        LLM(str(out))
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 3, "group_size": 32}
    with open(out / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="GPTQ with bits=3 is not supported"):
        LLM(str(out))
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    with open(out / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="already quantized"):
        LLM(str(out), quantization="int8")


# --- our quantizers ----------------------------------------------------------------------------------


def test_gptq_has_lower_output_error_than_rtn():
    from pagedq.quant.gptq import gptq_quantize, hessian
    from pagedq.quant.rtn import rtn

    g = torch.Generator().manual_seed(0)
    n, k = 96, 256
    w = torch.randn(n, k, generator=g) * 0.05
    # correlated inputs with uneven channel magnitudes, as real activations have
    x = torch.randn(2048, 64, generator=g) @ torch.randn(64, k, generator=g)
    x = x * (torch.rand(k, generator=g) * 3 + 0.1)
    h = hessian(x)

    def err(qw):
        return ((x @ (w - qw.dequantize()).T) ** 2).mean().item()

    for bits, group in ((4, 64), (4, -1), (8, 128)):
        base = err(rtn(w, bits, group, sym=False))
        for act_order in (False, True):
            e = err(gptq_quantize(w, h, bits, group, sym=False, act_order=act_order))
            assert e < 0.7 * base, (bits, group, act_order, e, base)


@pytest.mark.parametrize(
    ("arch", "method", "opts"),
    [
        ("llama", "gptq", dict(act_order=True)),
        ("llama", "gptq", dict(bits=8, sym=True)),
        ("llama", "awq", {}),
        ("llama", "rtn", {}),
        # an architecture added through the registry alone is quantizable by every quantizer
        ("granite", "gptq", dict(act_order=True)),
        ("granite", "awq", {}),
        ("granite", "rtn", {}),
    ],
)
def test_quantizer_writes_checkpoints_that_load_back(model_factory, tmp_path, arch, method, opts):
    from pagedq.quant import quantize

    tiny_llama = model_factory(arch)
    res = quantize(
        tiny_llama,
        str(tmp_path / method),
        method=method,
        group_size=32,
        num_samples=4,
        seq_len=64,
        progress=False,
        **opts,
    )
    with open(tmp_path / method / "config.json") as f:
        qcfg = json.load(f)["quantization_config"]
    assert qcfg["quant_method"] == ("awq" if method == "awq" else "gptq")
    with LLM(res.out_dir, dtype="float32") as llm:
        model = llm.engine.runner.model
        for i, layer in enumerate(model.layers):
            for parent, fused, parts in (
                ("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
                ("self_attn", "o_proj", ("o_proj",)),
                ("mlp", "gate_up_proj", ("gate_proj", "up_proj")),
                ("mlp", "down_proj", ("down_proj",)),
            ):
                got = getattr(getattr(layer, parent), fused).dequantize(torch.float32)
                want = torch.cat([res.weights[f"model.layers.{i}.{parent}.{p}"].dequantize() for p in parts])
                torch.testing.assert_close(got, want, rtol=0, atol=0)
        out = llm.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) > 0 for o in out)


# --- evaluation ---------------------------------------------------------------------------------------


def test_evaluate_perplexity_matches_hf_and_kl_orders_the_quantizations(tiny_llama):
    from transformers import AutoModelForCausalLM

    from pagedq.quality import compare, evaluate

    texts = [PROMPTS[4] * 3, PROMPTS[8] * 2]
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with LLM(tiny_llama, dtype="float32") as llm:
        tok = llm.get_tokenizer()
        res = evaluate(llm, texts, reference=llm, decode_tokens=4, decode_runs=1)
    nll, n = 0.0, 0
    for t in texts:
        ids = torch.tensor([tok.encode(t)])
        with torch.no_grad():
            logp = torch.log_softmax(hf(ids).logits[0, :-1].float(), -1)
        nll -= logp.gather(1, ids[0, 1:, None]).sum().item()
        n += ids.shape[1] - 1
    assert res.num_tokens == n
    assert res.perplexity == pytest.approx(float(torch.exp(torch.tensor(nll / n))), rel=1e-4)
    assert res.kl_divergence == pytest.approx(0.0, abs=1e-6)
    assert res.decode_tokens_per_s > 0

    rows = compare(
        tiny_llama,
        {"fp32": {}, "int8": {"quantization": "int8"}, "int4": {"quantization": "int4"}},
        texts=texts,
        dtype="float32",
        decode_tokens=0,
    )
    assert [r.name for r in rows] == ["fp32", "int8", "int4"]
    fp32, int8, int4 = rows
    assert fp32.kl_divergence == pytest.approx(0.0, abs=1e-6)
    assert 0 < int8.kl_divergence < int4.kl_divergence
    assert int4.weight_bytes < int8.weight_bytes < fp32.weight_bytes


# --- bitsandbytes checkpoints ------------------------------------------------------------------------


def write_bnb(src: str, out_q: str, out_dense: str, mode: str, double_quant: bool = False):
    """Serialize like transformers does for bitsandbytes (weight + SCB, or weight + quant state)."""
    import bitsandbytes as bnb

    tensors = load_file(os.path.join(src, "model.safetensors"))
    qt, dt = {}, {}
    for name, t in tensors.items():
        module, _, leaf = name.rpartition(".")
        if module.rpartition(".")[2] not in PROJ or leaf != "weight":
            qt[name] = dt[name] = t
            continue
        if mode == "int8":
            cb, scb, _ = bnb.functional.int8_vectorwise_quant(t.half())
            qt[name], qt[f"{module}.SCB"] = cb, scb
            qt[f"{module}.weight_format"] = torch.tensor([0], dtype=torch.uint8)
            dt[name] = cb.float() * scb[:, None] / 127.0
        else:
            packed, state = bnb.functional.quantize_4bit(
                t.bfloat16(), quant_type=mode, compress_statistics=double_quant, blocksize=64
            )
            qt[name] = packed
            for k, v in state.as_dict(packed=True).items():
                qt[f"{name}.{k}"] = v
            dt[name] = bnb.functional.dequantize_4bit(packed, state).float()
    if mode == "int8":
        qconfig = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    else:
        qconfig = {
            "quant_method": "bitsandbytes",
            "load_in_4bit": True,
            "bnb_4bit_quant_type": mode,
            "bnb_4bit_use_double_quant": double_quant,
            "bnb_4bit_compute_dtype": "bfloat16",
        }
    save_twins(src, out_q, out_dense, qt, dt, qconfig)


@pytest.mark.parametrize(
    ("mode", "double_quant"), [("int8", False), ("nf4", False), ("nf4", True), ("fp4", True)]
)
def test_bitsandbytes_checkpoints_generate_like_their_dequantized_twin(
    model_factory, tmp_path, mode, double_quant
):
    pytest.importorskip("bitsandbytes")
    src = model_factory("qwen2")  # with q/k/v biases
    qdir, ddir = str(tmp_path / "q"), str(tmp_path / "d")
    write_bnb(src, qdir, ddir, mode, double_quant)
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    with LLM(ddir, dtype="float32") as llm:
        ref = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, sp, use_tqdm=False)]
    with LLM(qdir, dtype="float32") as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, sp, use_tqdm=False)]
        layer = llm.engine.runner.model.layers[0].mlp.down_proj
        assert type(layer).__name__ == ("Int8Linear" if mode == "int8" else "Bnb4bitLinear")
    assert got == ref
    if mode != "int8":  # bf16 activations go through bitsandbytes' own 4-bit matmul
        with LLM(qdir, dtype="bfloat16") as llm:
            out = llm.generate(PROMPTS[:2], sp, use_tqdm=False)
            assert all(len(o.outputs[0].token_ids) == 16 for o in out)


def test_bitsandbytes_missing_names_the_extra(model_factory, tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    src = model_factory("llama")
    write_bnb(src, str(tmp_path / "q"), str(tmp_path / "d"), "nf4")
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)
    with pytest.raises(ValueError, match=r"pip install 'pagedq\[bnb\]'"):
        LLM(str(tmp_path / "q"))


def test_compare_schemes_table_and_plot(tiny_llama, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from pagedq.quality import compare

    monkeypatch.setenv("PAGEDQ_CACHE", str(tmp_path))
    table = compare(
        tiny_llama,
        schemes=["fp32", "int8", "gptq4", "awq4", "kv-int8"],
        texts=[PROMPTS[4] * 3],
        group_size=32,
        decode_tokens=0,
        plot=True,
    )
    assert [r.name for r in table] == ["fp32", "int8", "gptq4", "awq4", "kv-int8"]
    assert table[0].kl_divergence == pytest.approx(0.0, abs=1e-6)
    assert all(r.kl_divergence > 0 for r in table.rows[1:])
    assert table[2].weight_bytes < table[1].weight_bytes < table[0].weight_bytes
    html = table._repr_html_()
    assert "gptq4" in html
    assert "perplexity" in html
    assert len(os.listdir(tmp_path / "quantized")) == 2  # the GPTQ and AWQ checkpoints, cached
    fig = table.plot()
    assert len(fig.axes) == 4
