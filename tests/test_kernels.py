"""Attention kernels: the native CPU kernel against the torch reference, and the writes."""

from __future__ import annotations

import json

import pytest
import torch
from pagedq.kernels import AttentionMetadata, native
from pagedq.kernels.attention import (
    dequantize_kv,
    paged_attention_decode,
    paged_attention_decode_torch,
    quantize_kv,
    reshape_and_cache,
)

from .conftest import count_stack_calls

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


def _step_case(h, kvh, d, bs, dtype, cache_dtype, seed=0):
    """A step of every kind of row: decodes (one of a one-token context, one ending on a block
    boundary), chunks after a cached context, and whole fresh prompts; random block tables. The
    kernel walks the keys in chunks of about 64 (whole blocks): the last decode and chunk span
    several."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(1, 1), (1, 3 * bs), (1, 2 * bs + 5), (1, 37), (5, 29), (bs + 3, 2 * bs + 7), (9, 9), (1, 2)]
    shapes += [(1, 4 * bs + 70), (20, 150), (70, 200)]
    nblocks = sum((ctx + bs - 1) // bs for _, ctx in shapes) + 2
    k = torch.randn(nblocks, bs, kvh, d, generator=g)
    v = torch.randn(nblocks, bs, kvh, d, generator=g)
    kc, ks = quantize_kv(k.to(dtype), cache_dtype)
    vc, vs = quantize_kv(v.to(dtype), cache_dtype)
    perm = torch.randperm(nblocks, generator=g).tolist()
    tables, used = [], 0
    for _, ctx in shapes:
        nb = (ctx + bs - 1) // bs
        tables.append(perm[used : used + nb])
        used += nb
    maxb = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (maxb - len(t)) for t in tables])
    starts = torch.tensor([0, *[n for n, _ in shapes]]).cumsum(0)[:-1]
    q = torch.randn(int(sum(n for n, _ in shapes)), h, d, generator=g).to(dtype)
    return q, kc, vc, ks, vs, padded, starts, shapes


def _reference(q, kc, vc, ks, vs, tables, starts, shapes, scale, window):
    """Attention in float32 from the dequantized blocks, with an explicit causal/window mask."""
    h, kvh = q.shape[1], kc.shape[2]
    out = torch.zeros(q.shape)
    for b, (n, ctx) in enumerate(shapes):
        ids = tables[b, : (ctx + kc.shape[1] - 1) // kc.shape[1]]
        k = dequantize_kv(kc[ids], None if ks is None else ks[ids], torch.float32).reshape(
            -1, kvh, q.shape[2]
        )[:ctx]
        v = dequantize_kv(vc[ids], None if vs is None else vs[ids], torch.float32).reshape(
            -1, kvh, q.shape[2]
        )[:ctx]
        k, v = k.repeat_interleave(h // kvh, 1), v.repeat_interleave(h // kvh, 1)
        rows = q[starts[b] : starts[b] + n].float()
        qpos = torch.arange(ctx - n, ctx)[:, None]
        kpos = torch.arange(ctx)[None, :]
        mask = (kpos <= qpos) & ((kpos > qpos - window) if window else True)
        scores = torch.einsum("qhd,khd->hqk", rows, k) * scale
        p = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        out[starts[b] : starts[b] + n] = torch.einsum("hqk,khd->qhd", p, v)
    return out


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cache", ["same", "int8", "fp8"])
@pytest.mark.parametrize(("h", "kvh", "d"), [(4, 4, 64), (9, 3, 64), (8, 2, 128), (6, 3, 80), (10, 2, 64)])
@pytest.mark.parametrize("bs", [1, 16])
@pytest.mark.parametrize("window", [0, 7])
def test_native_attention_matches_the_reference_for_every_kind_of_row(dtype, cache, h, kvh, d, bs, window):
    """Decodes, chunks after a cached context and fresh prompts in one call, for float32 and
    bf16 queries over a cache of their dtype, int8 codes with scales, or fp8 bytes; head sizes
    that are multiples of 32 run the AVX2 path where the CPU has it, 80 the portable one. With
    AVX-512, tasks of several query tokens run the rows of a KV head down the vector lanes: full
    tiles of 48 rows (16 tokens x 3 query heads), partial ones, and 5 query heads per KV head (9
    tokens: 45 rows in 48 lanes). Tolerance: 1e-5 in float32; bf16 outputs are rounded to bf16
    (2^-8 relative) after float32 math."""
    cache_dtype = {"same": dtype, "int8": torch.int8, "fp8": torch.uint8}[cache]
    q, kc, vc, ks, vs, tables, starts, shapes = _step_case(h, kvh, d, bs, dtype, cache_dtype)
    lens = torch.tensor([n for n, _ in shapes])
    ctxs = torch.tensor([c for _, c in shapes])
    out = torch.full_like(q, 7.0)
    # every sequence but the last: its rows must be left as they were
    native.paged_attention(
        q, kc, vc, tables[:-1], starts[:-1], lens[:-1], ctxs[:-1], d**-0.5, ks, vs, window, out=out
    )
    ref = _reference(q, kc, vc, ks, vs, tables, starts, shapes, d**-0.5, window)
    last = int(starts[-1])
    assert out.dtype == dtype
    torch.testing.assert_close(out[:last].float(), ref[:last], atol=TOL[dtype], rtol=TOL[dtype])
    assert bool((out[last:] == 7.0).all())


@needs_native
def test_native_decode_path_matches_torch():
    """The decode entry point (``paged_attention_decode``) on the native kernel and on torch."""
    q, kc, vc, _tables, _lens, meta = _decode_case(5, 8, 2, 64, 16, torch.float32)
    ref = paged_attention_decode_torch(q, kc, vc, meta, 64**-0.5)
    got = paged_attention_decode(q, kc, vc, meta, 64**-0.5)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


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


@needs_native
def test_native_argmax_picks_torchs_index_in_every_case():
    """The sampler's greedy pick: the first index of the largest value, NaN counting as the
    largest, -inf rows giving 0 -- torch.argmax's ids, also on a row-strided view, in float32
    and in bf16 (read as it is; rounding to bf16 makes more ties, the first still wins)."""
    torch.manual_seed(0)
    x = torch.randn(67, 1000)
    x[1, 999] = 50.0  # the max at the very end
    x[2, 10] = x[2, 500] = 60.0  # a tie: the first wins
    x[3] = float("-inf")
    x[4, 300] = float("nan")
    x[4, 100] = 70.0
    x[5, 7] = x[5, 900] = float("nan")  # several NaN: the first
    x[6, :] = 1.0  # all equal
    x[7, 64] = 80.0  # the first element of a second block of 64
    x[8, 63] = 80.0  # the last element of the first block
    x[9] = torch.finfo(torch.float32).min
    big = torch.randn(64, 49152)
    for view in (x, x[:, :777], big, x.bfloat16(), x.bfloat16()[:, :777], big.bfloat16()):
        assert native.argmax_supports(view)
        assert torch.equal(native.argmax_rows(view), view.argmax(dim=-1))
    assert not native.argmax_supports(x.t())  # columns are not contiguous
    assert not native.argmax_supports(x.half())


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_fused_add_rms_norm_and_silu_mul_match_the_torch_ops(monkeypatch, dtype, rows):
    """The fused kernels against the model's torch ops (the reference, PAGEDQ_CPU_KERNELS=torch):
    the residual sum is one rounding, so it is exact; the normalised rows differ at most in the
    order of the float32 sum of squares (1e-6 relative in float32, one bf16 step in bf16)."""
    from pagedq.models.llama import RMSNorm

    g = torch.Generator().manual_seed(rows)
    norm = RMSNorm(96, 1e-6).to(dtype)
    norm.weight.data = (torch.rand(96, generator=g) + 0.5).to(dtype)
    x = torch.randn(rows, 96, generator=g).to(dtype) * 3
    delta = torch.randn(rows, 96, generator=g).to(dtype)
    gate_up = torch.randn(rows, 2 * 80, generator=g).to(dtype) * 4
    res, normed = norm.add_forward(x, delta)
    plain = norm(x)
    act = native.silu_mul(gate_up)
    monkeypatch.setenv("PAGEDQ_CPU_KERNELS", "torch")
    ref_res, ref_normed = norm.add_forward(x, delta)
    ref_plain = norm(x)
    gate, up = gate_up.split(80, dim=-1)
    ref_act = torch.nn.functional.silu(gate) * up
    assert torch.equal(res, ref_res)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 8e-3}
    torch.testing.assert_close(normed, ref_normed, **tol)
    torch.testing.assert_close(plain, ref_plain, **tol)
    torch.testing.assert_close(act, ref_act, **tol)
    assert normed.dtype == act.dtype == dtype


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("h", "kvh", "d"), [(4, 2, 64), (6, 3, 80)])
@pytest.mark.parametrize("tokens", [1, 5, 300])
def test_rope_cache_is_the_torch_rotation_and_cache_write_to_the_last_bit(dtype, h, kvh, d, tokens):
    """The fused rope + KV write against the model's rotation (``RotaryEmbedding``) and
    ``reshape_and_cache``: bit-exact in float32 and bf16 (the same roundings, no fused
    multiply-adds); Q and K rotated in place in the fused QKV rows, V untouched; cache slots not
    written stay as they were."""
    from pagedq.models.llama import RotaryEmbedding

    g = torch.Generator().manual_seed(tokens)
    rope = RotaryEmbedding(d, 1024, 1e4, {}, dtype)
    qkv = torch.randn(tokens, (h + 2 * kvh) * d, generator=g).to(dtype)
    positions = torch.randint(0, 1024, (tokens,), generator=g)
    slots = torch.randperm(2 * tokens + 3, generator=g)[:tokens]
    k_cache = torch.randn(2 * tokens + 3, kvh, d, generator=g).to(dtype)
    v_cache = torch.randn(2 * tokens + 3, kvh, d, generator=g).to(dtype)
    ref_k_cache, ref_v_cache = k_cache.clone(), v_cache.clone()
    q, k, v = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
    ref_q, ref_k = rope(positions, q.reshape(tokens, h, d), k.reshape(tokens, kvh, d))
    ref_v = v.clone()
    reshape_and_cache(ref_k, v.reshape(tokens, kvh, d), ref_k_cache, ref_v_cache, slots)
    assert native.rope_cache_supports(qkv, rope.cos, k_cache)
    native.rope_cache(qkv, h, kvh, positions, rope.cos, rope.sin, slots, k_cache, v_cache)
    q, k, v = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
    assert torch.equal(q.reshape(tokens, h, d), ref_q)
    assert torch.equal(k.reshape(tokens, kvh, d), ref_k)
    assert torch.equal(v, ref_v)
    assert torch.equal(k_cache, ref_k_cache)
    assert torch.equal(v_cache, ref_v_cache)
    assert not native.rope_cache_supports(qkv, rope.cos, k_cache.to(torch.int8))


@needs_native
@pytest.mark.parametrize("linear", ["auto", "onednn", "fp32"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    ("arch", "overrides"),
    [("llama", {}), ("qwen2", {}), ("mistral", {"sliding_window": 6}), ("granite", {}), ("qwen3", {})],
)
def test_the_native_decoder_stack_gives_the_python_paths_tokens_and_logprobs(
    model_factory, monkeypatch, dtype, arch, overrides, linear
):
    """Few-row steps run all layers in one native call (``native.decoder_layers``): the
    same kernels in the same order, so greedy tokens and their log-probabilities are those of the
    per-layer Python path to the last bit, one sequence and five at once (QKV bias, a sliding
    window). Granite's scaled layers and Qwen3's per-head norms are not what the C code does:
    they keep the Python path. The stack needs the weights laid out for the native few-row
    kernels: float32 weights in panels; bf16 ones in panels where they are packed as float32 (an
    AVX2 CPU, or ``PAGEDQ_CPU_LINEAR=fp32``), in AMX tiles on an AMX CPU; where bf16 weights are
    for oneDNN only (a bf16 CPU without AMX, or ``PAGEDQ_CPU_LINEAR=onednn``) the Python path
    runs."""
    from pagedq.kernels import cpu_linear

    from pagedq import LLM, SamplingParams
    from pagedq.models.llama import LlamaForCausalLM

    from .conftest import PROMPTS

    monkeypatch.setenv("PAGEDQ_CPU_LINEAR", linear)
    if linear != "auto" and (dtype == "float32" or not cpu_linear.bf16_native()):
        pytest.skip("the same path as auto on this CPU")
    panels = (
        dtype == "float32"
        or cpu_linear.compute_dtype(torch.bfloat16) == torch.float32
        or (linear == "auto" and native.amx_supported())
    )
    model = model_factory(arch, **overrides)
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    calls = count_stack_calls(monkeypatch)

    def run():
        with LLM(model, dtype=dtype) as llm:
            outs = [
                llm.generate(PROMPTS[:1], sp, use_tqdm=False),
                llm.generate(PROMPTS[:5], sp, use_tqdm=False),  # gemv tiles of 3 + 2 rows
            ]
        return [[(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in out] for out in outs]

    fast = run()
    # the prompts' steps too: fresh prompts attend through the native kernel where the runner
    # sends them there (float32, bf16 packed as float32 on a CPU without native bf16), through
    # the AMX prompt kernel inside the stack on an AMX CPU, else the step is the Python path's
    with open(f"{model}/config.json") as f:
        cfg = json.load(f)
    h, kvh = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    fits = native.prompt_attention_fits(h, kvh, cfg.get("head_dim") or cfg["hidden_size"] // h)
    prompts_native = dtype == "float32" or not cpu_linear.bf16_native() or fits
    if arch in ("granite", "qwen3") or not panels:
        assert calls == []
    else:
        assert calls.count(1) == calls.count(5) == 11  # every decode step
        assert len(calls) == 2 * 11 + (2 if prompts_native else 0)
    monkeypatch.setattr(LlamaForCausalLM, "_native_stack", lambda *a: False)
    assert run() == fast


needs_amx = pytest.mark.skipif(
    native.library() is None or not native.amx_supported(), reason="this CPU (or build) has no AMX"
)


@needs_amx
def test_on_amx_decode_steps_past_64_sequences_run_the_native_stack_with_the_python_paths_tokens(
    model_factory, monkeypatch
):
    """bf16 weights in AMX tiles serve calls of up to ``cpu_linear.AMX_TILE_ROWS`` rows (512), and
    so does the native decoder stack: a decode step of 70 sequences (two row chunks past the
    64-row limit of the float32 panels) runs as one native call, with the per-layer Python
    path's tokens and log-probabilities to the last bit."""
    from pagedq.kernels import cpu_linear

    from pagedq import LLM, SamplingParams
    from pagedq.models.llama import LlamaForCausalLM

    monkeypatch.delenv("PAGEDQ_CPU_GEMV_ROWS", raising=False)
    assert cpu_linear.gemv_rows(tiles=True) == cpu_linear.AMX_TILE_ROWS == 512
    assert cpu_linear.gemv_rows() == 64
    model = model_factory("llama")
    prompts = [{"prompt_token_ids": [1 + (7 * i + j) % 200 for j in range(3 + i % 9)]} for i in range(70)]
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)
    calls = count_stack_calls(monkeypatch)

    def run():
        with LLM(model, dtype="bfloat16") as llm:
            out = llm.generate(prompts, sp, use_tqdm=False)
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in out]

    fast = run()
    assert calls.count(70) == 5  # every decode step of the batch
    calls.clear()
    monkeypatch.setattr(LlamaForCausalLM, "_native_stack", lambda *a: False)
    assert run() == fast
    assert calls == []


@needs_amx
@pytest.mark.parametrize(("arch", "overrides"), [("llama", {}), ("mistral", {"sliding_window": 6})])
def test_on_amx_a_mixed_step_of_decodes_and_new_prompts_runs_the_native_stack_with_the_python_paths_tokens(
    model_factory, monkeypatch, arch, overrides
):
    """A step of five decodes and three fresh prompts (a server's usual step; 344 rows, within
    ``cpu_linear.AMX_TILE_ROWS``) runs as one native call: the prompts' rows attend to their own K/V through the AMX prompt kernel inside the
    stack, as ``_paged_attention_native`` does for the Python path; greedy tokens and
    log-probabilities are the Python path's to the last bit (with a sliding window too)."""
    from pagedq import LLM, SamplingParams
    from pagedq.models.llama import LlamaForCausalLM

    model = model_factory(arch, num_attention_heads=2, num_key_value_heads=1, head_dim=32, **overrides)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
    first = [[1 + (5 * i + j) % 150 for j in range(4 + i)] for i in range(5)]
    later = [[2 + (11 * i + j) % 170 for j in range(20 + 9 * i)] for i in range(2)]
    later.append([3 + 13 * j % 160 for j in range(290)])  # the step: 344 rows, past 256
    calls = count_stack_calls(monkeypatch)

    def run():
        done = {}
        with LLM(model, dtype="bfloat16") as llm:
            eng = llm.engine
            for i, p in enumerate(first):
                eng.add_request({"prompt_token_ids": p}, sp, request_id=f"a{i}")
            for _ in range(2):  # the prompts, then a decode step
                eng.step()
            for i, p in enumerate(later):
                eng.add_request({"prompt_token_ids": p}, sp, request_id=f"b{i}")
            while eng.has_unfinished_requests():
                for out in eng.step():
                    if out.finished:
                        done[out.request_id] = (out.outputs[0].token_ids, out.outputs[0].logprobs)
        return done

    fast = run()
    assert len(fast) == 8
    assert 5 + sum(map(len, later)) in calls  # the mixed step, natively
    calls.clear()
    monkeypatch.setattr(LlamaForCausalLM, "_native_stack", lambda *a: False)
    assert run() == fast
    assert calls == []


def _prompt_case(h, kvh, d, lens, seed=0):
    """Prompts packed into the rows of a fused QKV output (strided Q/K/V views, as the model
    hands them over), two rows before the first prompt and three after the last."""
    g = torch.Generator().manual_seed(seed)
    t = sum(lens) + 5
    qkv = torch.randn(t, (h + 2 * kvh) * d, generator=g).bfloat16()
    q = qkv[:, : h * d].view(t, h, d)
    k = qkv[:, h * d : (h + kvh) * d].view(t, kvh, d)
    v = qkv[:, (h + kvh) * d :].view(t, kvh, d)
    starts = torch.tensor([2 + sum(lens[:i]) for i in range(len(lens))])
    return q, k, v, starts, torch.tensor(lens)


def _prompt_reference(q, k, v, starts, lens, scale, window):
    h, kvh = q.shape[1], k.shape[1]
    out = torch.zeros(q.shape)
    for s, n in zip(starts.tolist(), lens.tolist()):
        qq, kk, vv = (x[s : s + n].float().transpose(0, 1) for x in (q, k, v))
        kk, vv = kk.repeat_interleave(h // kvh, 0), vv.repeat_interleave(h // kvh, 0)
        pos = torch.arange(n)
        mask = (pos[None, :] <= pos[:, None]) & ((pos[None, :] > pos[:, None] - window) if window else True)
        p = ((qq @ kk.transpose(1, 2)) * scale).masked_fill(~mask, float("-inf")).softmax(-1)
        out[s : s + n] = (p @ vv).transpose(0, 1)
    return out


@needs_amx
@pytest.mark.parametrize(
    ("h", "kvh", "d", "lens", "window"),
    [
        (9, 3, 64, [1, 15, 16, 17, 63, 64, 65, 130], 0),  # both sides of every tile and chunk edge
        (4, 4, 128, [33, 200], 0),
        (8, 2, 32, [100, 7], 0),
        (6, 2, 96, [80], 0),  # a d group of two tiles
        (9, 3, 64, [300, 50], 37),  # a sliding window: chunks before it skipped, masks inside
        (9, 3, 64, [150], 64),
    ],
)
def test_amx_prompt_attention_matches_the_float32_reference(h, kvh, d, lens, window):
    """Fresh prompts' causal attention through AMX tiles (``native.prompt_attention``) against
    float32 math with an explicit mask. Tolerance: 1.5e-2 absolute and relative -- bf16 inputs,
    the probabilities rounded to bf16 for the PV product (as torch's flash attention does) and
    the output rounded to bf16 (2^-8 relative) after float32 sums. Rows outside the prompts are
    not written."""
    q, k, v, starts, n = _prompt_case(h, kvh, d, lens)
    out = torch.full(q.shape, 7.0).bfloat16()
    native.prompt_attention(q, k, v, starts, n, d**-0.5, window, out)
    ref = _prompt_reference(q, k, v, starts, n, d**-0.5, window)
    rows = torch.cat([torch.arange(s, s + m) for s, m in zip(starts.tolist(), lens)])
    torch.testing.assert_close(out[rows].float(), ref[rows], atol=1.5e-2, rtol=1.5e-2)
    assert bool((out[:2] == 7.0).all())
    assert bool((out[-3:] == 7.0).all())


@needs_amx
def test_amx_prompt_attention_is_batch_invariant_and_checks_its_inputs():
    """A prompt's rows are the same bits whether it is attended alone or with others (its
    units never mix prompts); bad shapes and ranges are refused before anything is written."""
    q, k, v, starts, n = _prompt_case(9, 3, 64, [70, 129, 16])
    together = torch.zeros(q.shape).bfloat16()
    native.prompt_attention(q, k, v, starts, n, 0.125, 0, together)
    for i in range(3):
        alone = torch.zeros(q.shape).bfloat16()
        native.prompt_attention(q, k, v, starts[i : i + 1], n[i : i + 1], 0.125, 0, alone)
        s, e = int(starts[i]), int(starts[i] + n[i])
        assert torch.equal(alone[s:e], together[s:e])
    out = torch.zeros(q.shape).bfloat16()
    with pytest.raises(ValueError, match=r"every prompt must be a non-empty range of the 220 rows"):
        native.prompt_attention(q, k, v, torch.tensor([200]), torch.tensor([21]), 0.125, 0, out)
    with pytest.raises(ValueError, match=r"every prompt must be a non-empty range"):
        native.prompt_attention(q, k, v, torch.tensor([3]), torch.tensor([0]), 0.125, 0, out)
    with pytest.raises(ValueError, match=r"starts and lens must be int64 vectors of one length"):
        native.prompt_attention(q, k, v, torch.tensor([3]), torch.tensor([1, 2]), 0.125, 0, out)
    with pytest.raises(ValueError, match=r"out must be bf16 of the query's shape"):
        native.prompt_attention(q, k, v, starts, n, 0.125, 0, out.float())
    assert not bool(out.any())
    # what the kernel does not take: float32, a head size that is not a multiple of 32
    assert native.prompt_attention_supports(q, k, v)
    assert not native.prompt_attention_supports(q.float(), k.float(), v.float())
    q80, k80, v80, _, _ = _prompt_case(4, 2, 80, [5])
    assert not native.prompt_attention_supports(q80, k80, v80)


@needs_amx
def test_a_bf16_model_attends_prompts_through_amx_as_close_to_float32_as_sdpa(model_factory, monkeypatch):
    """Whole bf16 models: fresh prompts go through the AMX kernel, one call per layer for all the
    step's prompts (a sliding-window model too), and every next-token distribution of the
    prompts stays as close to the float32 model's as with torch's SDPA in their place (within
    1.5x its largest log-probability error + 0.002; a softmax scale off by 2x fails that). On
    the per-layer Python path, where the calls can be counted: the native decoder stack calls
    the same kernel from C and gives that path's tokens to the bit (the mixed-step test above)."""
    from pagedq import LLM
    from pagedq.models.llama import LlamaForCausalLM

    from .conftest import PROMPTS

    # tiny models' heads are 16 wide: 32 here, the narrowest the kernel takes
    for arch, overrides in (("llama", {"head_dim": 32}), ("mistral", {"head_dim": 32, "sliding_window": 6})):
        model = model_factory(arch, **overrides)
        with LLM(model, dtype="float32") as llm:
            ref = llm.next_token_logprobs(PROMPTS)
        calls: list[int] = []
        monkeypatch.setattr(LlamaForCausalLM, "_native_stack", lambda *a: False)

        def counted(*a, calls=calls, amx=native.prompt_attention):
            calls.append(len(a[4]))
            return amx(*a)

        monkeypatch.setattr(native, "prompt_attention", counted)
        with LLM(model, dtype="bfloat16") as llm:
            fast = llm.next_token_logprobs(PROMPTS)
        assert calls
        assert set(calls) == {len(PROMPTS)}
        monkeypatch.setattr(native, "prompt_attention_supports", lambda *a: False)
        with LLM(model, dtype="bfloat16") as llm:
            slow = llm.next_token_logprobs(PROMPTS)
        monkeypatch.undo()
        err_fast = max(float((f - r).abs().max()) for f, r in zip(fast, ref))
        err_slow = max(float((s - r).abs().max()) for s, r in zip(slow, ref))
        assert err_fast <= 1.5 * err_slow + 0.002, (arch, err_fast, err_slow)


@needs_native
def test_the_attention_kernels_avx2_build_equals_the_reference_too(tmp_path):
    """With AVX-512 the attention kernel runs 16-float vectors for head sizes that are multiples
    of 64; ``PAGEDQ_CPU_ISA=avx2`` compiles it without, so that such a CPU checks the 8-float
    path as well: this file's attention tests in a fresh process with that build."""
    from .conftest import run_on_avx2_build

    run_on_avx2_build(tmp_path, "test_kernels.py", "attention and not avx2_build")
