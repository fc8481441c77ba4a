"""Dense layers over weights packed once for the CPU (``pagedq.kernels.cpu_linear``): every path
available here against ``F.linear``, the engine's packing, and the switch that picks a path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pagedq.kernels import cpu_linear

from pagedq.models.llama import Linear

# float32: different blocking only; bf16: the output is rounded to bf16 (2^-8 relative) and the
# reference itself is a bf16 GEMM.
TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 2e-2)}


@pytest.mark.parametrize("mode", ["auto", "fp32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [0, 1, 5, 64, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_f_linear(monkeypatch, mode, dtype, rows, bias):
    monkeypatch.setenv("PAGEDQ_CPU_LINEAR", mode)
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(200, 96, generator=g).to(dtype)
    b = torch.randn(200, generator=g).to(dtype) if bias else None
    x = torch.randn(rows, 96, generator=g).to(dtype)
    packed = cpu_linear.pack(w, b)
    assert packed is not None
    expect = (
        torch.bfloat16
        if dtype == torch.bfloat16 and mode == "auto" and cpu_linear.bf16_native()
        else torch.float32
    )
    assert packed.compute_dtype == expect
    got = cpu_linear.linear(x, packed)
    ref = F.linear(x.float(), w.float(), None if b is None else b.float()).to(dtype)
    assert got.dtype == dtype
    assert got.shape == (rows, 200)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.float(), ref.float(), atol=atol, rtol=rtol)
    # leading dimensions are kept
    x3 = x.reshape(1, rows, 96)
    assert cpu_linear.linear(x3, packed).shape == (1, rows, 200)


def test_torch_mode_packs_nothing_and_a_bad_mode_names_the_choices(monkeypatch):
    monkeypatch.setenv("PAGEDQ_CPU_LINEAR", "torch")
    assert cpu_linear.pack(torch.randn(8, 8)) is None
    monkeypatch.setenv("PAGEDQ_CPU_LINEAR", "amx-please")
    with pytest.raises(
        ValueError, match=r"PAGEDQ_CPU_LINEAR must be one of auto, fp32, torch; got 'amx-please'"
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


@pytest.mark.parametrize("mode", ["auto", "torch"])
def test_the_engine_packs_on_cpu_and_its_tokens_do_not_change(tiny_llama, monkeypatch, mode):
    """Greedy tokens in float32 with and without packing are the same; packed bytes are counted
    and replace the plain ones (a tied LM head would add its own packed copy)."""
    from pagedq import LLM, SamplingParams

    from .conftest import PROMPTS

    monkeypatch.setenv("PAGEDQ_CPU_LINEAR", mode)
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
        if model.lm_head is not None:  # untied: every packed weight replaced its plain copy
            assert weight_bytes == ref_bytes
