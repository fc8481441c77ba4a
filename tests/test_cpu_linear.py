"""Dense layers over weights packed once for the CPU (``pagedq.kernels.cpu_linear``): every path
available here against ``F.linear``, the engine's packing, and the switch that picks a path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pagedq.kernels import cpu_linear, native

from pagedq.models.llama import Linear

# float32: different blocking only; bf16: the output is rounded to bf16 (2^-8 relative) and the
# reference itself is a bf16 GEMM.
TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 2e-2)}


@pytest.mark.parametrize("mode", ["auto", "onednn", "fp32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 4, 5, 8, 9, 17, 33, 64, 65, 300])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("gemv_rows", ["8", "0"])
def test_packed_linear_equals_f_linear(monkeypatch, mode, dtype, rows, bias, gemv_rows):
    monkeypatch.setenv("PAGEDQ_CPU_LINEAR", mode)
    monkeypatch.setenv("PAGEDQ_CPU_GEMV_ROWS", gemv_rows)
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(200, 96, generator=g).to(dtype)
    b = torch.randn(200, generator=g).to(dtype) if bias else None
    x = torch.randn(rows, 96, generator=g).to(dtype)
    packed = cpu_linear.pack(w, b)
    assert packed is not None
    expect = (
        torch.bfloat16
        if dtype == torch.bfloat16 and mode != "fp32" and cpu_linear.bf16_native()
        else torch.float32
    )
    assert packed.compute_dtype == expect
    # the few-row kernel reads the weight's panels where the weight is packed as float32, its
    # AMX tiles where it stays bf16 on an AMX CPU (not with PAGEDQ_CPU_LINEAR=onednn)
    amx = expect == torch.bfloat16 and mode == "auto" and native.amx_supported()
    few = (expect == torch.float32 or amx) and gemv_rows != "0" and native.library() is not None
    assert (packed.panels is not None) == few
    if few:  # panels keep the weight's dtype (a bf16 model's: half the bytes to stream)
        panels = native.W_BF16_PANELS if dtype == torch.bfloat16 else native.W_F32_PANELS
        assert native.weight_kind(packed.panels) == (native.W_AMX_TILES if amx else panels)
    assert packed.gemv_rows == (8 if few else 0)
    got = cpu_linear.linear(x, packed)
    ref = F.linear(x.float(), w.float(), None if b is None else b.float()).to(dtype)
    assert got.dtype == dtype
    assert got.shape == (rows, 200)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.float(), ref.float(), atol=atol, rtol=rtol)
    # leading dimensions are kept
    x3 = x.reshape(1, rows, 96)
    assert cpu_linear.linear(x3, packed).shape == (1, rows, 200)


@pytest.mark.parametrize(
    ("machine", "mkldnn", "avx512_bf16", "amx", "flags", "expect"),
    [
        ("x86_64", True, False, False, "avx512f avx512bw avx512vl avx512dq", False),  # emulated
        ("x86_64", True, True, False, "avx512f avx512_bf16", True),
        ("x86_64", True, False, True, "amx_tile amx_bf16", True),
        ("x86_64", True, False, False, "avx2 avx_ne_convert", True),
        ("x86_64", False, True, True, "", False),  # torch built without it
        ("aarch64", True, False, False, "", True),  # Arm: mkldnn's answer
    ],
)
def test_bf16_counts_as_native_only_with_a_bf16_dot_product(
    monkeypatch, machine, mkldnn, avx512_bf16, amx, flags, expect
):
    """oneDNN "supports" bf16 on any AVX-512 BW/VL/DQ CPU by emulating it (a fifth of the
    float32 speed there): such a CPU packs bf16 weights as float32, like an AVX2 one."""
    monkeypatch.setattr(cpu_linear.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: mkldnn)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset(flags.split()))
    cpu_linear.bf16_native.cache_clear()
    try:
        assert cpu_linear.bf16_native() is expect
    finally:
        monkeypatch.undo()
        cpu_linear.bf16_native.cache_clear()


def test_row_buckets_are_exact_to_64_rows_then_pad_under_a_sixteenth():
    """Few primitives per GEMM shape (oneDNN caches 1024), little padded work per call."""
    buckets = [cpu_linear.rows_bucket(m) for m in range(1, 4097)]
    assert buckets[:64] == list(range(1, 65))
    for m, b in enumerate(buckets, start=1):
        assert m <= b
        assert b - m < max(1, m / 16), (m, b)
    assert buckets == sorted(buckets)  # more rows never run with fewer
    assert len(set(buckets[:2048])) == 64 + 5 * 16  # exact, then 16 per doubling to 2048
    assert cpu_linear.rows_bucket(65) == 68
    assert cpu_linear.rows_bucket(257) == 272


@pytest.mark.skipif(native.library() is None, reason="the native CPU kernels cannot be built here")
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gemv_equals_the_float32_product_for_few_rows_and_odd_shapes(w_dtype, x_dtype):
    """Rows 1-13, 24, 25 and 64 (whole tiles of six input rows, twelve with AVX-512, and every
    remainder), outputs not a multiple of the 16-row panel, inputs of any length; the output in
    x's dtype. Tolerance: float32 summation order (1e-5 relative); bf16 outputs one rounding (2^-8
    relative)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(1, 7, 5), (2, 960, 576), (3, 13, 17), (5, 4, 8), (4, 1, 1031), (6, 33, 40), (7, 16, 9)]
    shapes += [(m, 50, 24) for m in (8, 11, 12, 13, 24, 25)] + [(64, 70, 31)]
    for m, n, k in shapes:
        w = torch.randn(n, k, generator=g).to(w_dtype)
        x = torch.randn(m, k, generator=g).to(x_dtype)
        b = torch.randn(n, generator=g)
        p = native.panels(w)
        assert p.shape == (-(-n // 16), k, 16)
        assert p.dtype == w_dtype
        for bias in (None, b):
            got = native.gemv(x, p, bias, n)
            ref = x.float() @ w.float().T + (0 if bias is None else bias)
            assert got.dtype == x_dtype
            if x_dtype == torch.float32:
                torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)
            else:
                torch.testing.assert_close(got, ref.to(torch.bfloat16), atol=1e-2, rtol=8e-3)
        # a row's result does not depend on the rows it is batched with (one sum per output, in order)
        if x_dtype == torch.float32 and m > 1:
            assert torch.equal(native.gemv(x[-1:], p, None, n)[0], native.gemv(x, p, None, n)[-1])
    with pytest.raises(ValueError, match="gemv: x has 3 features, the weight 4"):
        native.gemv(torch.ones(1, 3), native.panels(torch.ones(2, 4)), None, 2)
    with pytest.raises(ValueError, match=r"gemv: the weight must be laid out by panels\(\) or amx_tiles\(\)"):
        native.gemv(torch.ones(1, 4), torch.ones(2, 4), None, 2)
    with pytest.raises(ValueError, match="gemv: n=17 does not fit a weight of 1 panels of 16"):
        native.gemv(torch.ones(1, 4), native.panels(torch.ones(2, 4)), None, 17)


@pytest.mark.skipif(
    native.library() is None or not native.amx_supported(), reason="this CPU (or build) has no AMX"
)
def test_the_amx_kernel_equals_the_float32_product_at_every_tile_edge():
    """bf16 through AMX tiles (``native.amx_tiles`` + ``native.gemv``): rows on both sides of
    the 16-row tile and the 32-row chunk, outputs and inputs not multiples of the 32-wide tile
    blocks, `bench`'s shapes. Tolerance: one bf16 rounding of the float32 sum (2^-8 relative),
    pairs of products summed per step. A row's result does not depend on its batch, bit for bit."""
    g = torch.Generator().manual_seed(0)
    shapes = [(1, 7, 5), (2, 960, 576), (15, 33, 40), (16, 32, 32), (17, 100, 64), (31, 576, 1536)]
    shapes += [(32, 50, 24), (33, 3072, 576), (40, 20, 64), (48, 65, 1031), (64, 576, 576), (70, 40, 31)]
    for m, n, k in shapes:
        w = torch.randn(n, k, generator=g).bfloat16()
        x = torch.randn(m, k, generator=g).bfloat16()
        b = torch.randn(n, generator=g)
        t = native.amx_tiles(w)
        assert t.shape == (-(-n // 32), -(-k // 32), 2, 16, 16, 2)
        assert native.weight_kind(t) == native.W_AMX_TILES
        for bias in (None, b):
            got = native.gemv(x, t, bias, n)
            ref = x.float() @ w.float().T + (0 if bias is None else bias)
            assert got.dtype == torch.bfloat16
            torch.testing.assert_close(got, ref.to(torch.bfloat16), atol=1e-2, rtol=8e-3)
        assert torch.equal(native.gemv(x[-1:], t, None, n)[0], native.gemv(x, t, None, n)[-1])
    w = torch.randn(40, 64).bfloat16()
    assert native.gemv(torch.ones(0, 64).bfloat16(), native.amx_tiles(w), None, 40).shape == (0, 40)
    with pytest.raises(
        ValueError, match=r"gemv: a weight in AMX tiles takes bf16 inputs, got torch\.float32"
    ):
        native.gemv(torch.ones(1, 64), native.amx_tiles(w), None, 40)
    with pytest.raises(ValueError, match="gemv: x has 20 features, the weight 64"):
        native.gemv(torch.ones(1, 20).bfloat16(), native.amx_tiles(w), None, 40)
    with pytest.raises(ValueError, match="gemv: n=65 does not fit a weight of 2 panels of 32"):
        native.gemv(torch.ones(1, 64).bfloat16(), native.amx_tiles(w), None, 65)


@pytest.mark.skipif(
    native.library() is None or not native.amx_supported(), reason="this CPU (or build) has no AMX"
)
def test_on_amx_narrow_weights_keep_the_tile_kernel_up_to_1024_rows(monkeypatch):
    """Weights of at most ``NARROW_OUTPUTS`` outputs run the tile kernel for calls of up to
    ``NARROW_TILE_ROWS`` rows (oneDNN ran such GEMMs on one of two threads below 2048 rows), wider
    ones up to ``AMX_TILE_ROWS``; past the limit oneDNN runs the call. Results: the float32
    product within one bf16 rounding. ``PAGEDQ_CPU_GEMV_ROWS`` sets one limit for both."""
    monkeypatch.setenv("PAGEDQ_CPU_LINEAR", "auto")
    monkeypatch.delenv("PAGEDQ_CPU_GEMV_ROWS", raising=False)
    g = torch.Generator().manual_seed(0)
    narrow_w = torch.randn(576, 1536, generator=g).bfloat16() * 0.05
    wide_w = torch.randn(3072, 576, generator=g).bfloat16() * 0.05
    narrow, wide = cpu_linear.pack(narrow_w), cpu_linear.pack(wide_w)
    assert narrow is not None
    assert wide is not None
    assert narrow.gemv_rows == cpu_linear.NARROW_TILE_ROWS == 1024
    assert wide.gemv_rows == cpu_linear.AMX_TILE_ROWS == 512
    calls: list[int] = []
    gemv = native.gemv
    monkeypatch.setattr(native, "gemv", lambda x, *a: calls.append(x.shape[0]) or gemv(x, *a))
    for p, w, rows in ((narrow, narrow_w, (700, 1024, 1025)), (wide, wide_w, (512, 513))):
        for m in rows:
            calls.clear()
            x = torch.randn(m, w.shape[1], generator=g).bfloat16()
            got = cpu_linear.linear(x, p)
            assert calls == ([m] if m <= p.gemv_rows else [])
            ref = x.float() @ w.float().T
            torch.testing.assert_close(got.float(), ref.bfloat16().float(), atol=1e-2, rtol=8e-3)
    monkeypatch.setenv("PAGEDQ_CPU_GEMV_ROWS", "100")
    assert cpu_linear.pack(narrow_w).gemv_rows == cpu_linear.pack(wide_w).gemv_rows == 100


def test_a_bad_gemv_rows_setting_names_what_is_allowed(monkeypatch):
    monkeypatch.setenv("PAGEDQ_CPU_GEMV_ROWS", "-1")
    with pytest.raises(
        ValueError, match=r"PAGEDQ_CPU_GEMV_ROWS must be a whole number of rows >= 0 \(0: off\); got '-1'"
    ):
        cpu_linear.pack(torch.randn(8, 8))


def test_torch_mode_packs_nothing_and_a_bad_mode_names_the_choices(monkeypatch):
    monkeypatch.setenv("PAGEDQ_CPU_LINEAR", "torch")
    assert cpu_linear.pack(torch.randn(8, 8)) is None
    monkeypatch.setenv("PAGEDQ_CPU_LINEAR", "amx-please")
    with pytest.raises(
        ValueError, match=r"PAGEDQ_CPU_LINEAR must be one of auto, onednn, fp32, torch; got 'amx-please'"
    ):
        cpu_linear.pack(torch.randn(8, 8))


def test_a_packed_layer_drops_its_plain_weight_and_set_weight_repacks():
    layer = Linear(16, 8, bias=True)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(3, 16)
    before = layer(x)
    assert layer.pack()
    assert layer.weight is None
    assert layer.bias is None
    assert layer.packed is not None
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
    new = torch.randn(8, 16)
    layer.set_weight(new)
    bias = layer.packed.bias
    torch.testing.assert_close(layer(x), F.linear(x, new, bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("mode", "gemv_rows"), [("auto", "8"), ("auto", "0"), ("torch", "8")])
def test_the_engine_packs_on_cpu_and_its_tokens_do_not_change(tiny_llama, monkeypatch, mode, gemv_rows):
    """Greedy tokens in float32 with and without packing, with and without the few-row kernel,
    are the same; packed bytes are counted and replace the plain ones, and the panels the
    few-row kernel reads count too."""
    from pagedq import LLM, SamplingParams

    from .conftest import PROMPTS

    monkeypatch.setenv("PAGEDQ_CPU_LINEAR", mode)
    monkeypatch.setenv("PAGEDQ_CPU_GEMV_ROWS", gemv_rows)
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    with LLM(tiny_llama, dtype="float32") as llm:
        model = llm.engine.runner.model
        layers = [m for m in model.modules() if isinstance(m, Linear)]
        packed = [m.packed is not None for m in layers]
        tokens = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, sp, use_tqdm=False)]
        weight_bytes = llm.stats()["weight_bytes"]
        plain = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    monkeypatch.setenv("PAGEDQ_CPU_LINEAR", "torch")
    with LLM(tiny_llama, dtype="float32") as llm:
        ref = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, sp, use_tqdm=False)]
        ref_bytes = llm.stats()["weight_bytes"]
    assert tokens == ref
    if mode == "torch":
        assert not any(packed)
        assert weight_bytes == ref_bytes
    else:
        assert all(packed)
        assert weight_bytes == plain + model.packed_bytes()
        kept = sum(m.packed.panels.numel() * 4 for m in layers if m.packed.panels is not None)
        assert (kept > 0) == (gemv_rows != "0" and native.library() is not None)
        if model.lm_head is not None:  # untied: every packed weight replaced its plain copy, panels added
            assert weight_bytes == ref_bytes + kept


@pytest.mark.skipif(native.library() is None, reason="no C compiler: the native kernels are off")
def test_the_panels_of_the_avx2_build_equal_f_linear_too(tmp_path):
    """With AVX-512 the few-row kernel takes two panels per call (a panel is one 16-float
    vector); ``PAGEDQ_CPU_ISA=avx2`` compiles it without, one panel as two 8-float halves, so an
    AVX-512 CPU checks both: the packed-linear tests in a fresh process with that build."""
    from .conftest import run_on_avx2_build

    run_on_avx2_build(tmp_path, "test_cpu_linear.py", "packed_linear_equals")


@pytest.mark.skipif(native.library() is None, reason="the native CPU kernels cannot be built here")
@pytest.mark.parametrize("bias", [False, True])
def test_the_mlp_of_a_bf16_model_on_float32_gemms_keeps_float32_between_them(monkeypatch, bias):
    """Where a bf16 model's GEMMs run in float32 (``PAGEDQ_CPU_LINEAR=fp32`` forces that path on
    any CPU), calls past the few-row kernel keep gate_up's product in float32 into SiLU·mul, which
    rounds it to bf16 as it reads and hands its bf16 values to down_proj as float32: the MLP's
    output equals, bit for bit, the one with both round trips through bf16. Few-row calls (the
    panels) keep the bf16 path."""
    from types import SimpleNamespace

    from pagedq.models.llama import MLP

    monkeypatch.setenv("PAGEDQ_CPU_LINEAR", "fp32")
    monkeypatch.setenv("PAGEDQ_CPU_GEMV_ROWS", "8")
    g = torch.Generator().manual_seed(0)
    mlp = MLP(SimpleNamespace(hidden_size=96, intermediate_size=160))
    for layer in (mlp.gate_up_proj, mlp.down_proj):
        layer.weight.data = (torch.randn(layer.weight.shape, generator=g) * 0.3).bfloat16()
        if bias:
            layer.bias = torch.nn.Parameter((torch.randn(layer.out_features, generator=g)).bfloat16(), False)
        assert layer.pack()
        assert layer.packed.compute_dtype == torch.float32
    calls = []
    real = native.silu_mul
    monkeypatch.setattr(
        native, "silu_mul", lambda t, round_bf16=False: calls.append(round_bf16) or real(t, round_bf16)
    )
    for rows in (8, 9, 100):
        x = (torch.randn(rows, 96, generator=g) * 2).bfloat16()
        calls.clear()
        got = mlp(x)
        assert calls == [rows > 8]
        assert got.dtype == torch.bfloat16
        with monkeypatch.context() as m:
            m.setattr(cpu_linear, "float32_output", lambda p, rows: False)
            calls.clear()
            ref = mlp(x)
            assert calls == [False]
        assert torch.equal(got, ref), rows
    with pytest.raises(
        ValueError, match=r"silu_mul: round_bf16 takes a float32 gate_up, got torch\.bfloat16"
    ):
        real(torch.ones(2, 4).bfloat16(), round_bf16=True)
