"""The native weight-only-quantized GEMM (``kernels/csrc/woq_gemm_cpu.c``, ``NativeQuantLinear``):
every format option against a dequantize reference, its packing, the row tiling, and whole
quantized models in bf16 against their dequantized fp32 twins."""

import pytest
import torch
from pagedq.kernels import native
from pagedq.quant.formats import QuantConfig, QuantWeight, awq_unpack, gptq_unpack
from pagedq.quant.linear import Int4Linear, NativeQuantLinear, make_quant_linear, pack_panels, unpack_panels

from pagedq import LLM, SamplingParams

from .conftest import PROMPTS, count_stack_calls
from .test_quant import (
    GPTQ_CASES,
    MODEL_CASES,
    random_weight,
    ref_dequant,
    ref_pack_awq,
    ref_pack_gptq,
    write_quantized,
)

pytestmark = pytest.mark.skipif(
    not native.woq_supported(), reason="the native int4/int8 GEMM needs a C compiler and AVX-512 BF16"
)

CPU = torch.device("cpu")
# rows: the direct path (1-6; with AVX-512 1-10: 7 and 10 too), then tiles over converted
# blocks of up to 6 rows (AVX2: 7 = 4 + 3, 13 = 5 + 4 + 4) or 12 (AVX-512: 11, 13 = 7 + 6,
# 25 = 9 + 8 + 8), and many (40)
ROWS = (1, 3, 6, 7, 10, 11, 13, 25, 40)


def assert_bf16_exact(layer, x: torch.Tensor, w: torch.Tensor, bias=None) -> None:
    """The kernel's output (bf16) is ``x @ w.T`` computed in fp32 and rounded once: it multiplies
    the integer codes exactly and applies scale and zero in fp32, so the only error is the final
    rounding to bf16 (2^-9 relative) plus fp32 summation order. The bias is added in bf16 after."""
    ref = x.float() @ w.T
    scale = float(ref.abs().max())
    out = layer._kernel(layer._prepare(x))
    torch.testing.assert_close(out.float(), ref, rtol=2**-8, atol=1e-5 * scale)
    if bias is not None:
        torch.testing.assert_close(layer(x).float(), ref + bias.float(), rtol=2**-8, atol=2**-8 * scale)


@pytest.mark.parametrize(("bits", "group", "sym", "act_order", "v1"), GPTQ_CASES)
def test_gptq_layer_in_bf16_equals_the_dequantized_reference(bits, group, sym, act_order, v1):
    n, k = 96, 256  # 96 output channels: the last 64-channel panel is padded
    q, zeros, scales, g_idx = random_weight(n, k, bits, group, sym, act_order, seed=bits * 10 + k, v1=v1)
    w = gptq_unpack(
        ref_pack_gptq(q, zeros, scales, g_idx, bits, v1),
        QuantConfig("gptq", bits, group, sym, act_order, "gptq" if v1 else "gptq_v2"),
    )
    ref_w = ref_dequant(q, zeros, scales, g_idx)
    bias = torch.randn(n).bfloat16()
    layer = make_quant_linear(w, bias, torch.bfloat16, CPU)
    assert isinstance(layer, NativeQuantLinear)
    torch.testing.assert_close(layer.dequantize(torch.float32), ref_w, rtol=0, atol=0)
    back = layer.quant_weight()  # the canonical weight out of the panels, act-order undone
    assert torch.equal(back.dequantize(), w.dequantize())
    assert torch.equal(back.g_idx, w.g_idx)
    for rows in ROWS:
        x = torch.randn(rows, k).bfloat16()
        assert_bf16_exact(layer, x, ref_w, bias)


def test_awq_layer_in_bf16_equals_the_dequantized_reference():
    n, k = 192, 256
    q, zeros, scales, g_idx = random_weight(n, k, 4, 64, False, False, seed=11, v1=False)
    w = awq_unpack(ref_pack_awq(q, zeros, scales), QuantConfig("awq", 4, 64, False))
    layer = make_quant_linear(w, None, torch.bfloat16, CPU)
    assert isinstance(layer, NativeQuantLinear)
    ref_w = ref_dequant(q, zeros, scales, g_idx)
    for rows in ROWS:
        x = torch.randn(rows, k).bfloat16()
        assert_bf16_exact(layer, x, ref_w)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_group_longer_than_the_k_block(bits):
    """Group 512 is converted in K blocks of 128: the zero-point term must enter once per group."""
    n, k = 64, 1024
    q, zeros, scales, g_idx = random_weight(n, k, bits, 512, False, False, seed=5)
    w = QuantWeight(q.to(torch.uint8), scales.float(), zeros.float(), g_idx, bits)
    layer = make_quant_linear(w, None, torch.bfloat16, CPU)
    assert isinstance(layer, NativeQuantLinear)
    assert layer.kc == 128
    assert layer.group_size == 512
    for rows in (2, 9):
        x = torch.randn(rows, k).bfloat16()
        assert_bf16_exact(layer, x, w.dequantize())
    x = torch.randn(2, 3, k).bfloat16()  # leading batch dims are flattened and restored
    assert torch.equal(layer(x), layer(x.view(6, k)).view(2, 3, n))
    # no rows: an empty result, as a dense layer gives (the kernel divided by its row tiles: SIGFPE)
    assert layer(torch.randn(0, k).bfloat16()).shape == (0, n)


@pytest.mark.parametrize("bits", [4, 8])
def test_panel_packing_round_trips(bits):
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 2**bits, (128, 96), generator=g, dtype=torch.uint8)
    packed = pack_panels(q, bits)
    assert packed.shape == ((2, 48, 64, 2) if bits == 8 else (2, 24, 64, 2))
    assert packed.numel() * packed.element_size() == q.numel() * bits // 8
    assert torch.equal(unpack_panels(packed, bits, 96), q)
    if bits == 4:  # the byte of channel c at t holds k = 4t + j (low) and 4t + 2 + j (high)
        c, t, j = 70, 5, 1
        byte = int(packed[c // 64, t, c % 64, j])
        assert byte & 0xF == q[c, 4 * t + j]
        assert byte >> 4 == q[c, 4 * t + 2 + j]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(
    ("n", "k", "group", "act_order"), [(70, 96, 32, False), (128, 256, 64, True), (40, 48, 16, False)]
)
def test_native_dequantize_and_the_many_row_path(monkeypatch, bits, n, k, group, act_order):
    """``native.woq_dequant`` gives the transposed weight of the layer's torch dequantization bit
    for bit (channels past a 64-panel, several groups, act-order). Where bf16 GEMMs run on AMX
    tiles, calls of ``AMX_DEQUANT_MIN_TOKENS`` rows and more multiply by it densely in bf16; on
    an AVX-512 CPU without bf16 dot products calls of ``FP32_DEQUANT_MIN_TOKENS`` rows and more
    do so in float32 (so bias and act-order permutation apply as on the kernel path); fewer rows run the
    kernel. With ``PAGEDQ_CPU_LINEAR=onednn`` every row count runs the kernel."""
    from pagedq.kernels import cpu_linear
    from pagedq.quant.linear import AMX_DEQUANT_MIN_TOKENS, FP32_DEQUANT_MIN_TOKENS

    q, zeros, scales, g_idx = random_weight(n, k, bits, group, False, act_order, seed=bits + n)
    w = QuantWeight(q.to(torch.uint8), scales.float(), zeros.float(), g_idx, bits)
    bias = torch.randn(n).bfloat16()
    layer = NativeQuantLinear(w, bias, torch.bfloat16)
    ref = layer._gemm_weight(torch.bfloat16)
    wt = native.woq_dequant(layer.codes, bits, layer.scales, layer.zeros, layer.group_size, k, n)
    assert wt.shape == (k, n)
    assert torch.equal(wt.t(), ref)
    np_ = layer.scales.shape[1]
    with pytest.raises(
        ValueError, match=rf"woq_dequant: codes of {np_} channels x {k} in groups of {group} do not fit"
    ):
        native.woq_dequant(layer.codes, bits, layer.scales, layer.zeros, layer.group_size, k, np_ + 1)
    amx = native.amx_supported()
    fp32 = not cpu_linear.bf16_native() and torch.cpu._is_avx512_supported()
    threshold = AMX_DEQUANT_MIN_TOKENS if amx else FP32_DEQUANT_MIN_TOKENS if fp32 else None
    assert layer.dequant_min_tokens == (threshold or 2**62)
    assert layer.dense_dtype == (torch.float32 if fp32 and not amx else torch.bfloat16)
    calls: list[int] = []
    real = native.woq_gemm
    monkeypatch.setattr(native, "woq_gemm", lambda *a: (calls.append(a[0].shape[0]), real(*a))[1])
    at = threshold or AMX_DEQUANT_MIN_TOKENS
    for m in (at - 1, at, 70):
        x = torch.randn(m, k).bfloat16()
        calls.clear()
        out = layer(x)
        dense = threshold is not None and m >= threshold
        assert calls == ([] if dense else [m])
        if dense:  # the product of the bf16 weight: each weight rounded once, then one GEMM
            if layer.dense_dtype == torch.float32:  # float32 sums, the product rounded once
                assert torch.equal(out, (layer._prepare(x).float() @ wt.float()).bfloat16() + bias)
            else:
                assert torch.equal(out, layer._prepare(x) @ wt + bias)
            ref = x.float() @ w.dequantize().T + bias.float()
            assert float((out.float() - ref).abs().max()) < 2**-6 * float(ref.abs().max())
        else:
            assert_bf16_exact(layer, x, w.dequantize(), bias)
    monkeypatch.setenv("PAGEDQ_CPU_LINEAR", "onednn")
    assert NativeQuantLinear(w, bias, torch.bfloat16).dequant_min_tokens == 2**62
    # an AVX2-only CPU keeps the kernel at every row count
    monkeypatch.delenv("PAGEDQ_CPU_LINEAR")
    monkeypatch.setattr(native, "amx_supported", lambda: False)
    monkeypatch.setattr(cpu_linear, "bf16_native", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: False)
    assert NativeQuantLinear(w, bias, torch.bfloat16).dequant_min_tokens == 2**62
    # the float32 dense path on any machine: as an AVX-512 CPU without bf16 dot products builds it
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: True)
    layer = NativeQuantLinear(w, bias, torch.bfloat16)
    assert (layer.dequant_min_tokens, layer.dense_dtype) == (FP32_DEQUANT_MIN_TOKENS, torch.float32)
    x = torch.randn(FP32_DEQUANT_MIN_TOKENS, k).bfloat16()
    calls.clear()
    assert torch.equal(layer(x), (layer._prepare(x).float() @ wt.float()).bfloat16() + bias)
    assert calls == []


@pytest.mark.parametrize(
    ("bits", "n", "k", "group"),
    [(4, 96, 256, 64), (4, 64, 384, 128), (8, 130, 192, 192), (8, 64, 96, 32), (4, 64, 100, 4)],
)
def test_the_amx_kernel_equals_the_reference_at_every_row_tile_edge(bits, n, k, group):
    """From 8 rows ``woq_gemm`` runs on AMX tiles where the CPU has them (K and the group
    multiples of 32; else the vdpbf16ps tiles): the same exact-codes arithmetic, so the same
    bound as the vector path (one bf16 rounding, fp32 sums) at row counts around its 16-row
    tiles and 32-row pairs, channels past a 64-panel, one or several groups. With the AMX path
    switched off (``native.set_woq_amx``) the vector kernel answers, and on AMX the two differ
    only in summation order (seen in 4-bit groups of 64 or more; 8-bit ones can come out bit-equal).
    K = 100 in groups of 4 never takes the tiles."""
    q, zeros, scales, g_idx = random_weight(n, k, bits, group, False, False, seed=bits * 7 + k)
    w = QuantWeight(q.to(torch.uint8), scales.float(), zeros.float(), g_idx, bits)
    layer = NativeQuantLinear(w, None, torch.bfloat16)
    ref_w = w.dequantize()
    tiles = native.amx_supported() and k % 32 == 0 and group % 32 == 0
    differed = False
    try:
        for m in (7, 8, 15, 16, 17, 31, 32, 33, 48, 64):
            x = torch.randn(m, k).bfloat16()
            assert native.set_woq_amx(False)  # on by default
            vector = layer._kernel(x)
            assert not native.set_woq_amx(True)
            assert_bf16_exact(layer, x, ref_w)
            tiled = layer._kernel(x)
            assert torch.equal(tiled, layer._kernel(x))  # deterministic
            if m < 8 or not tiles:  # the same vector kernel both times
                assert torch.equal(tiled, vector)
            differed |= not torch.equal(tiled, vector)
        # the tiles ran where they can: in 4-bit groups of 64 or more they sum in another order
        # than the vector kernel's K blocks, which shows in some output's last bit
        if bits == 4 and group >= 64:
            assert differed == tiles
    finally:
        native.set_woq_amx(True)


def test_fp32_activations_and_unsupported_weights_take_other_paths(monkeypatch):
    n, k = 64, 128
    q, zeros, scales, g_idx = random_weight(n, k, 4, 32, False, False, seed=9)
    w = QuantWeight(q.to(torch.uint8), scales.float(), zeros.float(), g_idx, 4)
    assert isinstance(make_quant_linear(w, None, torch.float32, CPU), Int4Linear)  # fp32: the exact path
    layer = make_quant_linear(w, None, torch.bfloat16, CPU)
    x = torch.randn(3, k)
    torch.testing.assert_close(layer(x), x @ w.dequantize().T, rtol=1e-5, atol=1e-4)  # fp32 input
    fractional = QuantWeight(w.q, w.scales, w.zeros + 0.5, g_idx, 4)  # zeros off the code grid
    assert not NativeQuantLinear.supports(fractional)
    monkeypatch.setattr(native, "woq_supported", lambda: False)  # a CPU without AVX-512 BF16
    assert isinstance(make_quant_linear(w, None, torch.bfloat16, CPU), Int4Linear)


@pytest.mark.parametrize(("arch", "fmt", "bits", "group", "sym", "act_order"), MODEL_CASES)
def test_quantized_model_in_bf16_follows_its_dequantized_twin(
    model_factory, tmp_path, arch, fmt, bits, group, sym, act_order
):
    """Whole models on the native kernel (prefill and decode): next-token log-probabilities of
    the bf16 quantized model stay within 0.1 of the fp32 model with the dequantized weights (the
    difference is bf16 activations, not the weights), and greedy decoding runs to the end."""
    src = model_factory(arch)
    qdir, ddir = str(tmp_path / "q"), str(tmp_path / "d")
    write_quantized(src, qdir, ddir, fmt, bits, group, sym, act_order)
    with LLM(ddir, dtype="float32") as llm:
        ref = llm.next_token_logprobs(PROMPTS)
    with LLM(qdir, dtype="bfloat16") as llm:
        assert isinstance(llm.engine.runner.model.layers[0].mlp.down_proj, NativeQuantLinear)
        got = llm.next_token_logprobs(PROMPTS)
        outs = llm.generate(
            PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False
        )
        assert all(len(o.outputs[0].token_ids) == 12 for o in outs)
    for g, r in zip(got, ref):
        assert (g - r).abs().max() < 0.1


@pytest.mark.parametrize(
    ("arch", "fmt", "bits", "group", "sym", "act_order"),
    [c for c in MODEL_CASES if c[0] != "granite"],
)
def test_the_native_stack_runs_quantized_layers_with_the_python_paths_tokens(
    model_factory, tmp_path, monkeypatch, arch, fmt, bits, group, sym, act_order
):
    """Batch-1 decode of a bf16 model with int8/int4 projections runs every layer in one native
    call (``native.decoder_layers`` with ``QuantPtrs``): the act-order permutation, Qwen2's QKV
    bias (added after the rounded product, as the module adds it) and the group epilogue are
    those of ``NativeQuantLinear``, so tokens and log-probabilities equal the Python path's."""
    import shutil

    from safetensors.torch import load_file, save_file

    from pagedq.models.llama import LlamaForCausalLM

    src = str(tmp_path / "src")  # transformers initialises biases to zero: give them values
    shutil.copytree(model_factory(arch), src)
    tensors = load_file(f"{src}/model.safetensors")
    g = torch.Generator().manual_seed(3)
    for name, t in tensors.items():
        if name.endswith(".bias"):
            tensors[name] = (torch.randn(t.shape, generator=g) * 0.5).to(t.dtype)
    save_file(tensors, f"{src}/model.safetensors", metadata={"format": "pt"})
    qdir = str(tmp_path / "q")
    write_quantized(src, qdir, str(tmp_path / "d"), fmt, bits, group, sym, act_order)
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)
    calls = count_stack_calls(monkeypatch)
    native_prompts = []

    def run():
        with LLM(qdir, dtype="bfloat16") as llm:
            assert isinstance(llm.engine.runner.model.layers[0].self_attn.qkv_proj, NativeQuantLinear)
            native_prompts.append(llm.engine.runner.native_prompts)
            outs = [
                llm.generate(PROMPTS[:1], sp, use_tqdm=False),
                llm.generate(PROMPTS[:3], sp, use_tqdm=False),
            ]
        return [[(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in out] for out in outs]

    fast = run()
    # every decode step; the prompts too (9 and 24 rows) where they attend through the native
    # kernel (a CPU without native bf16 dot products: model_runner.native_prompts)
    prompts = [9, 24] if native_prompts[0] else []
    assert sorted(set(calls)) == sorted([1, 3, *prompts])
    assert len(calls) == 2 * 9 + len(prompts)
    monkeypatch.setattr(LlamaForCausalLM, "_native_stack", lambda *a: False)
    assert run() == fast


def test_the_avx2_build_is_selectable_and_equals_the_reference(tmp_path):
    """``PAGEDQ_CPU_ISA=avx2`` compiles the kernels without AVX-512, so that a CPU with AVX-512
    BF16 runs (and these tests check) the AVX2 + FMA path of the weight-only GEMM as well: the
    layer tests of this file, in a fresh process with that build."""
    import os
    import subprocess
    import sys

    from .conftest import run_on_avx2_build

    env = {**os.environ, "PAGEDQ_CPU_ISA": "avx2", "PAGEDQ_CACHE": str(tmp_path)}
    probe = "from pagedq.kernels import native; print(native.woq_isa())"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "avx2"
    stdout = run_on_avx2_build(
        tmp_path, "test_woq_native.py", "layer_in_bf16 or longer_than or panel_packing"
    )
    assert "skipped" not in stdout


def test_an_unknown_isa_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("PAGEDQ_CPU_ISA", "avx9")
    with pytest.raises(ValueError, match=r"PAGEDQ_CPU_ISA='avx9': allowed values are native, avx2"):
        native._isa_flags()
