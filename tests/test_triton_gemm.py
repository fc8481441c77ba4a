"""Triton W4A16 / W8A16 GEMM (GPTQ and AWQ layouts) against the torch dequantize reference.

On machines without a GPU these run in Triton's interpreter (``TRITON_INTERPRET=1``, set in
conftest). Tolerances (max abs error / max abs reference): float32 1e-5, float16 2e-3,
bfloat16 2e-2.
"""

from __future__ import annotations

import pytest
import torch
from pagedq.quant.formats import QuantWeight
from pagedq.quant.linear import TritonQuantLinear

from pagedq import LLM, SamplingParams

from .conftest import PROMPTS

pytest.importorskip(
    "triton", reason="the Triton kernels need the triton package (pip install 'pagedq[triton]')"
)

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _weight(n, k, bits, group, act_order, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (n, k), generator=g).to(torch.uint8)
    groups = k // group
    scales = torch.rand(groups, n, generator=g) * 0.02 + 1e-3
    zeros = torch.randint(0, 2**bits, (groups, n), generator=g).float()
    g_idx = torch.arange(k) // group
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    return QuantWeight(q, scales, zeros, g_idx, bits)


@pytest.mark.parametrize(
    ("bits", "layout", "act_order"),
    [(4, "gptq", False), (4, "gptq", True), (8, "gptq", False), (8, "gptq", True), (4, "awq", False)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quant_matmul_equals_dequantize_reference(bits, layout, act_order, dtype):
    n, k = 96, 128  # 96 output channels: the last column tile is partial
    w = _weight(n, k, bits, 32, act_order, seed=bits + act_order)
    layer = TritonQuantLinear(w, None, dtype, DEVICE, layout)
    assert layer.awq == (layout == "awq")
    torch.testing.assert_close(layer.dequantize(torch.float32).cpu(), w.dequantize(), rtol=0, atol=0)
    for m in (1, 5, 17):
        x = torch.randn(m, k)
        ref = x @ w.dequantize().T
        out = layer(x.to(dtype).to(DEVICE)).float().cpu()
        xr = x.to(dtype).float() @ w.dequantize().T  # the rounding of x itself is not the kernel's
        err = ((out - xr).abs().max() / ref.abs().max()).item()
        assert err < TOL[dtype], (m, err)


def test_quantized_model_runs_on_the_triton_backend(model_factory, tmp_path, monkeypatch):
    from .test_quant import write_quantized

    src = model_factory("llama")
    qdir, ddir = str(tmp_path / "q"), str(tmp_path / "d")
    write_quantized(src, qdir, ddir, "gptq", 4, 32, False, True)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    with LLM(qdir, dtype="float32") as llm:
        ref = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:3], sp, use_tqdm=False)]
    monkeypatch.setenv("PAGEDQ_BACKEND", "triton")
    with LLM(qdir, dtype="float32") as llm:
        assert isinstance(llm.engine.runner.model.layers[0].mlp.down_proj, TritonQuantLinear)
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:3], sp, use_tqdm=False)]
    assert got == ref
