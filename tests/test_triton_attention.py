"""Triton paged attention, KV write and block copy against the torch reference.

Without a GPU these run in Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest).
The reference is the torch path in float32 over the same (dequantized) cache contents.
Tolerances, max abs error over max abs reference: float32 (and int8 / fp8 caches read in
float32) 1e-5; float16 2e-3; bfloat16 1.6e-2 (one bf16 rounding of the output).
"""

from __future__ import annotations

import pytest
import torch
from pagedq.kernels import AttentionMetadata, attention

from pagedq import LLM, SamplingParams

from .conftest import PROMPTS

pytest.importorskip(
    "triton", reason="the Triton kernels need the triton package (pip install 'pagedq[triton]')"
)

from pagedq.kernels import triton_attention as ta

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
STORE = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "fp8": torch.uint8,
}
QUERY = {"float16": torch.float16, "bfloat16": torch.bfloat16}  # others: float32 queries
TOL = {"float16": 2e-3, "bfloat16": 1.6e-2}


def _cache(nb, bs, kvh, hd, kind):
    k = torch.zeros(nb, bs, kvh, hd, dtype=STORE[kind], device=DEVICE)
    ks = torch.zeros(nb, bs, kvh, dtype=torch.float16, device=DEVICE) if kind == "int8" else None
    return k, k.clone(), ks, None if ks is None else ks.clone()


def _fill(lens, bs, kvh, hd, kind, seed, writer):
    """A cache holding sequences of ``lens`` tokens in shuffled blocks, written by ``writer``."""
    g = torch.Generator().manual_seed(seed)
    nb = sum(-(-n // bs) for n in lens) + 3
    perm = torch.randperm(nb, generator=g).tolist()
    tables, i = [], 0
    for n in lens:
        m = -(-n // bs)
        tables.append(perm[i : i + m])
        i += m
    k, v, ks, vs = _cache(nb, bs, kvh, hd, kind)
    dt = QUERY.get(kind, torch.float32)
    for table, n in zip(tables, lens):
        key = torch.randn(n, kvh, hd, generator=g).to(dt).to(DEVICE)
        val = torch.randn(n, kvh, hd, generator=g).to(dt).to(DEVICE)
        slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(n)], device=DEVICE)
        writer(key, val, k, v, slots, ks, vs)
    return tables, (k, v, ks, vs)


def _deq(cache, scale):
    return attention.dequantize_kv(cache, scale, torch.float32)


def _decode_meta(tables, lens, bs):
    width = max(len(t) for t in tables)
    ids = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=DEVICE)
    lens_t = torch.tensor(lens, device=DEVICE)
    mask = (torch.arange(width * bs, device=DEVICE)[None, :] < lens_t[:, None]).view(len(lens), 1, 1, -1)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.long, device=DEVICE),
        num_decode_tokens=len(lens),
        decode_block_ids=ids.view(-1),
        decode_max_blocks=width,
        decode_mask=mask,
        decode_context_lens=lens_t,
    )
    return meta, ids


def _rel_err(out, ref):
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


SHAPES = [  # (num_heads, num_kv_heads, head_dim, block_size)
    (4, 4, 64, 16),  # GQA ratio 1
    (4, 2, 80, 1),  # ratio 2, non-power-of-two head dim, one-token blocks
    (8, 2, 128, 32),  # ratio 4
]


@pytest.mark.parametrize("kind", list(STORE))
@pytest.mark.parametrize(("nh", "kvh", "hd", "bs"), SHAPES)
def test_decode_equals_reference(kind, nh, kvh, hd, bs):
    lens = [5, 37, 70]  # all end mid-block (for bs > 1)
    tables, (k, v, ks, vs) = _fill(
        lens, bs, kvh, hd, kind, seed=nh + hd + bs, writer=attention.reshape_and_cache
    )
    meta, ids = _decode_meta(tables, lens, bs)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(len(lens), nh, hd, generator=g).to(QUERY.get(kind, torch.float32)).to(DEVICE)
    ref = attention.paged_attention_decode_torch(q.float(), _deq(k, ks), _deq(v, vs), meta, hd**-0.5)
    for split in (None, 16):  # one split; splits of 16 tokens merged by the second kernel
        out = ta.paged_decode(q, k, v, ids, meta.decode_context_lens, hd**-0.5, ks, vs, split_tokens=split)
        assert out.dtype == q.dtype
        assert _rel_err(out, ref) < TOL.get(kind, 1e-5), (split, _rel_err(out, ref))


@pytest.mark.parametrize("kind", ["float32", "float16", "bfloat16", "int8", "fp8"])
@pytest.mark.parametrize(("nh", "kvh", "hd", "bs"), SHAPES)
def test_prefill_extend_equals_reference(kind, nh, kvh, hd, bs):
    """Chunks of a packed batch: a fresh prompt, a continuing chunk, a chunk after a cached prefix."""
    ctx_lens = [19, 40, 33]
    q_lens = [19, 7, 30]
    tables, (k, v, ks, vs) = _fill(
        ctx_lens, bs, kvh, hd, kind, seed=3 * hd + bs, writer=attention.reshape_and_cache
    )
    g = torch.Generator().manual_seed(2)
    total = sum(q_lens)
    q = torch.randn(total, nh, hd, generator=g).to(QUERY.get(kind, torch.float32)).to(DEVICE)
    chunks, start = [], 0
    for ql, cl in zip(q_lens, ctx_lens):
        chunks.append((start, ql, cl))
        start += ql
    width = max(len(t) for t in tables)
    tab = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEVICE)
    out = ta.paged_prefill(q, k, v, chunks, tab, hd**-0.5, ks, vs)
    kf, vf = _deq(k, ks), _deq(v, vs)
    for (s, ql, cl), table in zip(chunks, tables):
        chunk = attention.PrefillChunk(0, ql, cl, torch.tensor(table, device=DEVICE))
        dummy = torch.zeros(ql, kvh, hd, device=DEVICE)
        ref = attention.paged_attention_prefill(q[s : s + ql].float(), dummy, dummy, kf, vf, chunk, hd**-0.5)
        assert _rel_err(out[s : s + ql], ref) < TOL.get(kind, 1e-5)


@pytest.mark.parametrize("kind", list(STORE))
def test_kv_write_equals_reference(kind):
    lens, bs, kvh, hd = [9, 21], 4, 2, 80
    tables_t, cache_t = _fill(lens, bs, kvh, hd, kind, seed=5, writer=ta.reshape_and_cache)
    tables_r, cache_r = _fill(lens, bs, kvh, hd, kind, seed=5, writer=attention.reshape_and_cache)
    assert tables_t == tables_r
    (kt, vt, kst, vst), (kr, vr, ksr, vsr) = cache_t, cache_r
    # plain caches: inputs are already in the cache dtype; int8: the same float16 scales and
    # round-half-even codes; fp8: e4m3 bits computed exactly (integer arithmetic, RNE)
    for a, b in ((kt, kr), (vt, vr), (kst, ksr), (vst, vsr)):
        assert (a is None and b is None) or torch.equal(a, b)


def test_copy_blocks_equals_reference():
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(3, 2, 10, 4, 2, 8, generator=g).to(DEVICE)
    src = torch.tensor([1, 4, 7], device=DEVICE)
    dst = torch.tensor([2, 9, 0], device=DEVICE)
    ref = cache.clone()
    attention.copy_blocks(ref, src, dst, block_dim=2)
    attention.copy_blocks(cache, src, dst, block_dim=2, backend="triton")
    assert torch.equal(cache, ref)
    # a block that is a source and a destination in one batch goes to the gather-first torch op
    overlap = cache.clone()
    src2, dst2 = torch.tensor([2, 3], device=DEVICE), torch.tensor([3, 5], device=DEVICE)
    ref2 = overlap.clone()
    attention.copy_blocks(ref2, src2, dst2, block_dim=2)
    attention.copy_blocks(overlap, src2, dst2, block_dim=2, backend="triton")
    assert torch.equal(overlap, ref2)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_engine_on_triton_kernels_matches_torch(tiny_llama, monkeypatch, kv_cache_dtype):
    """The whole engine on the Triton backend: chunked prefill, decode, copy on write."""
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    fork = SamplingParams(n=2, temperature=0, max_tokens=6, ignore_eos=True)
    runs = {}
    for be in ("torch", "triton"):
        monkeypatch.setenv("PAGEDQ_BACKEND", be)
        with LLM(
            tiny_llama,
            dtype="float32",
            block_size=4,
            kv_cache_dtype=kv_cache_dtype,
            max_num_batched_tokens=16,
        ) as llm:
            assert llm.engine.runner.backend == be
            outs = llm.generate(PROMPTS[:4], sp, use_tqdm=False) + llm.generate(
                PROMPTS[4], fork, use_tqdm=False
            )
            runs[be] = [[c.token_ids for c in o.outputs] for o in outs]
    assert runs["triton"] == runs["torch"]


def test_backend_switch_errors(monkeypatch):
    from pagedq.kernels.backend import backend

    monkeypatch.setenv("PAGEDQ_BACKEND", "cuda")
    with pytest.raises(ValueError, match="PAGEDQ_BACKEND must be 'torch' or 'triton'"):
        backend(torch.device("cpu"))
    monkeypatch.setenv("PAGEDQ_BACKEND", "torch")
    assert backend(torch.device("cpu")) == "torch"


def _dense_reference(q, kf, vf, table, bs, q_pos, ctx, window, scale):
    """Attention of queries at ``q_pos`` over keys ``[0, ctx)`` of one sequence, written out."""
    slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(ctx)], device=q.device)
    k = kf.view(-1, *kf.shape[2:])[slots]  # [ctx, kvh, hd]
    v = vf.view(-1, *vf.shape[2:])[slots]
    nh, kvh = q.shape[1], k.shape[1]
    k = k.repeat_interleave(nh // kvh, dim=1)
    v = v.repeat_interleave(nh // kvh, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    pos = torch.arange(ctx, device=q.device)
    allowed = (pos[None, :] <= q_pos[:, None]) & (pos[None, :] > q_pos[:, None] - window)
    s = s.masked_fill(~allowed[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), v)


@pytest.mark.parametrize("kind", ["float32", "int8"])
def test_sliding_window(kind):
    nh, kvh, hd, bs, window = 4, 2, 64, 4, 7
    lens = [5, 30]
    tables, (k, v, ks, vs) = _fill(lens, bs, kvh, hd, kind, seed=11, writer=attention.reshape_and_cache)
    kf, vf = _deq(k, ks), _deq(v, vs)
    meta, ids = _decode_meta(tables, lens, bs)
    q = torch.randn(len(lens), nh, hd, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    for split in (None, 8):
        out = ta.paged_decode(
            q, k, v, ids, meta.decode_context_lens, hd**-0.5, ks, vs, split_tokens=split, window=window
        )
        for i, (table, n) in enumerate(zip(tables, lens)):
            ref = _dense_reference(
                q[i : i + 1], kf, vf, table, bs, torch.tensor([n - 1], device=DEVICE), n, window, hd**-0.5
            )
            assert _rel_err(out[i : i + 1], ref) < 1e-5
    # extend: 20 new queries at the end of a 30-token context
    ql, ctx = 20, 30
    qp = torch.randn(ql, nh, hd, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    tab = torch.tensor([tables[1]], dtype=torch.int32, device=DEVICE)
    out = ta.paged_prefill(qp, k, v, [(0, ql, ctx)], tab, hd**-0.5, ks, vs, window=window)
    ref = _dense_reference(
        qp, kf, vf, tables[1], bs, torch.arange(ctx - ql, ctx, device=DEVICE), ctx, window, hd**-0.5
    )
    assert _rel_err(out, ref) < 1e-5
