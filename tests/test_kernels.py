"""Attention kernels: the native CPU decode kernel against the torch reference, and the writes."""

from __future__ import annotations

import pytest
import torch
from pagedq.kernels import AttentionMetadata, native
from pagedq.kernels.attention import paged_attention_decode_torch, reshape_and_cache

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _decode_case(b, h, kvh, d, bs, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 5 * bs + 3, (b,), generator=g)
    lens[0] = 1  # a context of one token
    lens[-1] = 3 * bs  # one that ends exactly at a block boundary
    nblocks = int(sum((int(n) + bs - 1) // bs for n in lens)) + 3
    kc = torch.randn(nblocks, bs, kvh, d, generator=g).to(dtype)
    vc = torch.randn(nblocks, bs, kvh, d, generator=g).to(dtype)
    perm = torch.randperm(nblocks, generator=g).tolist()
    tables, i = [], 0
    for n in lens.tolist():
        k = (n + bs - 1) // bs
        tables.append(perm[i : i + k])
        i += k
    maxb = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (maxb - len(t)) for t in tables])
    q = torch.randn(b, h, d, generator=g).to(dtype)
    meta = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.long),
        num_decode_tokens=b,
        decode_block_ids=padded.view(-1),
        decode_max_blocks=maxb,
        decode_mask=(torch.arange(maxb * bs)[None] < lens[:, None]).view(b, 1, 1, maxb * bs),
        decode_context_lens=lens,
    )
    return q, kc, vc, padded, lens, meta


needs_native = pytest.mark.skipif(
    native.library() is None, reason="no C compiler: native CPU kernels unavailable"
)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("h", "kvh", "d"), [(4, 4, 64), (4, 2, 64), (8, 2, 128), (6, 3, 80)])
@pytest.mark.parametrize("bs", [1, 16])
def test_native_decode_matches_torch(dtype, h, kvh, d, bs):
    q, kc, vc, tables, lens, meta = _decode_case(5, h, kvh, d, bs, dtype)
    ref = paged_attention_decode_torch(q.float(), kc.float(), vc.float(), meta, d**-0.5)
    got = native.paged_decode(q, kc, vc, tables, lens, d**-0.5)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), ref, atol=TOL[dtype], rtol=TOL[dtype])


def test_reshape_and_cache_writes_slots():
    kc = torch.zeros(4, 2, 1, 3)
    vc = torch.zeros(4, 2, 1, 3)
    k = torch.arange(9.0).view(3, 1, 3)
    reshape_and_cache(k, -k, kc, vc, torch.tensor([7, 0, 3]))
    assert torch.equal(kc.view(-1, 1, 3)[[7, 0, 3]], k)
    assert torch.equal(vc.view(-1, 1, 3)[7], -k[0])
    assert kc.view(-1, 1, 3)[[1, 2, 4, 5, 6]].abs().sum() == 0


def test_engine_torch_path_matches_native(tiny_llama, monkeypatch):
    """The whole engine gives the same greedy tokens on the torch attention path."""
    from pagedq import LLM, SamplingParams

    from .conftest import PROMPTS

    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    with LLM(tiny_llama, dtype="float32") as llm:
        a = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, sp, use_tqdm=False)]
    monkeypatch.setenv("PAGEDQ_CPU_KERNELS", "torch")
    with LLM(tiny_llama, dtype="float32") as llm:
        b = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, sp, use_tqdm=False)]
    assert a == b


def test_loading_the_native_library_keeps_subnormal_floats():
    """Linking with -ffast-math would add crtfastmath.o, which switches the whole process to
    flush-to-zero when the library loads: numpy and torch in the user's kernel would then
    silently round every subnormal to zero."""
    import subprocess
    import sys

    code = (
        "import numpy as np; from pagedq.kernels import native; "
        "assert native.library() is not None, 'no C compiler here'; "
        "print(float(np.float64(5e-324) * 1.0))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if "no C compiler" in out.stderr:
        pytest.skip("no C compiler: the native library is not built here")
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip()) == 5e-324
